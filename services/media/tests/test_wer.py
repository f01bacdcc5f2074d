"""Word error rate of the local recogniser on caller utterances carried over a phone line.

Each utterance in :data:`UTTERANCES` is synthesised by the bundled Piper voice (8 kHz µ-law, as
the provider emits it), band-limited to 300-3400 Hz with a little hiss (``phone_line``), framed
into 20 ms with silence before and after, and fed through the full local path: VAD → segmenter
→ Whisper tiny.en (``WhisperSttStream``). Audio goes in faster than real time: the segmenter is
frame-driven, not clock-driven, so the result is the same. The Finals of each utterance are
joined and scored against its text after normalising case, punctuation, contractions and how
numbers are written ("seven thirty" / "730", "nineteen eighty five" / "1985").
"""

import re

import pytest

from parley.media.providers.base import Final
from parley.media.providers.local.whisper_stt import WhisperStt
from services.media.tests.utterances import (
    SILENCE_FRAME,
    UTTERANCES,
    frames,
    phone_line,
    synthesise,
)

WER_BUDGET = 0.15

# -- normalising ------------------------------------------------------------------------------

CONTRACTIONS = {
    "i'm": "i am", "i'd": "i would", "i'll": "i will", "i've": "i have", "it's": "it is",
    "that's": "that is", "what's": "what is", "there's": "there is", "don't": "do not",
    "doesn't": "does not", "can't": "cannot", "won't": "will not", "we're": "we are",
    "you're": "you are", "isn't": "is not", "we'd": "we would", "let's": "let us",
}
UNITS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {word: 10 * value for value, word in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
ORDINALS = {word: value for value, word in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
    "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth".split(),
    start=1)} | {"twentieth": 20, "thirtieth": 30}


def _ordinal(value: int) -> str:
    suffix = "th" if 11 <= value % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")
    return f"{value}{suffix}"


def normalise(text: str) -> list[str]:
    """Lower-case words; contractions expanded; every run of numbers one token of digits."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=[a-z])\.(?=[a-z])", " dot ", text).replace("@", " at ")
    tokens = []
    for token in re.findall(r"[a-z0-9']+", text):
        token = token.strip("'")
        tokens += CONTRACTIONS.get(token, token).split()
    # spoken numbers to digits: "eighty five" → 85, "twenty first" → 21st
    spoken: list[str] = []
    for token in tokens:
        previous = spoken[-1] if spoken else ""
        tens = previous.isdigit() and len(previous) == 2 and previous.endswith("0") and \
            previous != "10"
        if token in UNITS and 0 < UNITS[token] < 10 and tens:
            spoken[-1] = str(int(previous) + UNITS[token])
        elif token in ORDINALS and ORDINALS[token] < 10 and tens:
            spoken[-1] = _ordinal(int(previous) + ORDINALS[token])
        elif token in UNITS:
            spoken.append(str(UNITS[token]))
        elif token in TENS:
            spoken.append(str(TENS[token]))
        elif token in ORDINALS:
            spoken.append(_ordinal(ORDINALS[token]))
        else:
            spoken.append(token)
    # a run of numbers is one number however it was grouped: "555 213 4879" = "5552134879"
    merged: list[str] = []
    for token in spoken:
        if token.isdigit() and merged and merged[-1].isdigit():
            merged[-1] += token
        else:
            merged.append(token)
    return merged


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(pairs: list[tuple[str, str]]) -> float:
    """Corpus WER: total word errors over total reference words."""
    errors = sum(word_errors(normalise(ref), normalise(hyp)) for ref, hyp in pairs)
    return errors / sum(len(normalise(ref)) for ref, _ in pairs)


def test_word_errors():
    assert word_errors([], []) == 0
    assert word_errors("a b c".split(), "a b c".split()) == 0
    assert word_errors("a b c".split(), "a x c".split()) == 1  # substitution
    assert word_errors("a b c".split(), "a c".split()) == 1  # deletion
    assert word_errors("a b c".split(), "a b c d".split()) == 1  # insertion
    assert word_errors("a b".split(), []) == 2
    assert word_errors([], "a b".split()) == 2
    assert word_errors("the cat sat".split(), "cat sat down".split()) == 2
    assert word_error_rate([("a b c d", "a b x d"), ("e f", "e f")]) == pytest.approx(1 / 6)


@pytest.mark.parametrize(("spoken", "written"), [
    ("Can I come at three?", "can i come at 3"),
    ("a table at seven thirty tonight", "A table at 730 tonight."),
    ("born nineteen eighty five", "born 1985"),
    ("the twelfth of March", "The 12th of March."),
    ("five five five, two one three, four eight seven nine", "555-213. 487-9."),
    ("order seven four two nine one", "Order 74291."),
    ("on the twenty first", "on the 21st"),
    ("I'm calling, I would like walk ins", "I am calling. I'd like walk-ins!"),
    ("john dot smith at gmail dot com", "john.smith@gmail.com"),
    ("P A T E L", "P-A-T-E-L"),
    ("eighty five", "85"),
])
def test_normalise_makes_spoken_and_written_forms_equal(spoken, written):
    assert normalise(spoken) == normalise(written)


# -- the measurement --------------------------------------------------------------------------


async def transcribe_call(stt: WhisperStt, ulaw: bytes) -> str:
    """One stream: 0.5 s silence, the utterance, 1 s silence; the Finals' text joined."""
    stream = await stt.open()
    for frame in [SILENCE_FRAME] * 25 + frames(ulaw) + [SILENCE_FRAME] * 50:
        await stream.send(frame)
    await stream.close()  # decodes what is queued, then ends events
    return " ".join([event.text async for event in stream.events() if isinstance(event, Final)])


@pytest.fixture(scope="module")
def phone_audio() -> list[bytes]:
    return [phone_line(ulaw, seed=index) for index, ulaw in enumerate(synthesise(UTTERANCES))]


async def test_word_error_rate_on_phone_line_speech(phone_audio, capsys):
    assert len(UTTERANCES) >= 20
    stt = WhisperStt()
    pairs = [(text, await transcribe_call(stt, ulaw))
             for text, ulaw in zip(UTTERANCES, phone_audio, strict=True)]
    wer = word_error_rate(pairs)
    words = sum(len(normalise(ref)) for ref, _ in pairs)
    with capsys.disabled():
        print(f"\nlocal STT (Whisper tiny.en, WebRTC VAD) on {len(pairs)} Piper utterances over "
              f"an 8 kHz µ-law phone line: WER {wer:.1%} ({words} words)")
        for ref, hyp in pairs:
            errors = word_errors(normalise(ref), normalise(hyp))
            if errors:
                print(f"  {errors} error(s): {ref!r} → {hyp!r}")
    assert wer <= WER_BUDGET
