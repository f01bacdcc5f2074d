"""Turn detection: deciding when the caller has finished speaking.

Pure state, driven by the call's audio clock (milliseconds of inbound audio, from the gateway's
frame timestamps) so the same audio always gives the same turns, live or replayed after a
failover. Inputs are the VAD's speech start/stop and the recogniser's partials, finals and
utterance ends (an empty final retracts the partial before it: the recogniser heard no words
there after all); :meth:`TurnDetector.poll`, called once per inbound frame, answers with nothing,
a request to flush the recogniser (:class:`Flush`), or the end of the turn (:class:`TurnEnd`).

A turn ends when the caller has been silent for ``endpointing_ms`` and the recogniser has caught
up (a final covers everything said, no partial is pending). A recogniser's own end of utterance
(Deepgram ``speech_final`` / ``UtteranceEnd``, Whisper's segment end) lets it end after half
that silence. If the recogniser lags, it is asked to flush at ``endpointing_ms``; after
``max_wait_ms`` of silence the turn ends with whatever text there is (reason ``max_wait``). What
the recogniser delivers after that for the audio before the caller spoke again is that turn's
late words (:meth:`TurnDetector.late_for`), not a new turn: a recogniser slower than the max wait
(local Whisper on a starved CPU) otherwise turned one sentence into two turns, and a final that
came once the caller had spoken again put the old turn's words at the start of the new one.
Once the recogniser has ended the utterance (and before the caller speaks again), late finals
that say more than the turn did revise it: a :class:`TurnEnd` with ``revises`` set and the whole
text replaces the turn that ended on a stale partial ("I would like..." → "I would like to book
an appointment on Friday at ten."), as a person who answered too soon stops and answers what
was actually said.

Backchannels ("uh-huh", "okay", "mm-hmm") do not end a turn early: a turn whose text is only
backchannels needs twice the silence; and while the agent is speaking they are no turn at all
(the caller is listening, not answering), so they are dropped and counted.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from parley.common.configuration.models import DEFAULT_BACKCHANNELS

Reason = Literal["silence", "utterance_end", "max_wait", "dtmf"]  # dtmf: a turn of keys


def _combining_marks() -> str:
    """A character class body of the BMP's combining marks (Unicode category M)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if unicodedata.category(chr(code)).startswith("M"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(f"{chr(first)}-{chr(last)}" for first, last in ranges)


# A word: letters and digits of any script (as parley.common.words.normalize_words has them)
# and apostrophes, with the combining marks inside it (Devanagari's vowel signs, Thai's tone
# marks: ``\w`` alone cuts "नमस्ते" in two), hyphenated parts kept together. ``[a-z0-9']``
# found no word in Cyrillic, Devanagari or Japanese text: barge-in on words never fired.
_WORD_CHARACTER = rf"[\w'{_combining_marks()}]"
_WORD = re.compile(rf"{_WORD_CHARACTER}+(?:-{_WORD_CHARACTER}+)*")
# Spellings of one backchannel that recognisers (and agent configurations) write differently,
# matched as the first: "OK" as "okay", "Mhm" / "mm-hm" as "mm hmm", "Uhhuh" as "uh huh".
_BACKCHANNEL_SPELLINGS = {
    "ok": ("okay",), "mhm": ("mm", "hmm"), "mhmm": ("mm", "hmm"), "mmhm": ("mm", "hmm"),
    "mmhmm": ("mm", "hmm"), "hm": ("hmm",), "hmmm": ("hmm",), "mmm": ("mm",),
    "uhhuh": ("uh", "huh"), "yup": ("yep",),
}


def words_of(text: str) -> list[str]:
    """Case-folded words of ``text``, any script, without punctuation ("Uh-huh." → ["uh-huh"])."""
    return _WORD.findall(text.casefold())


def _backchannel_words(text: str) -> list[str]:
    """The words of ``text`` as backchannels are compared: hyphens as spaces, one spelling."""
    words: list[str] = []
    for word in words_of(text.replace("-", " ")):
        words.extend(_BACKCHANNEL_SPELLINGS.get(word, (word,)))
    return words


class Backchannels:
    """Recognises text made only of backchannel phrases.

    Phrases and text are compared in one spelling (see ``_backchannel_words``), so a configured
    "uh-huh" also matches "Uh huh." and "uhhuh", and "okay" matches "OK.".
    """

    def __init__(self, phrases: tuple[str, ...] | list[str] = DEFAULT_BACKCHANNELS) -> None:
        self._phrases = {tuple(words) for phrase in phrases
                         if (words := _backchannel_words(phrase))}
        self._longest = max((len(p) for p in self._phrases), default=1)
        # Asked on every frame about text that changes a few times a turn: the last answers.
        self._only: tuple[str, bool] = ("", False)
        self._content: tuple[str, int] = ("", 0)

    def only_backchannel(self, text: str) -> bool:
        """True if ``text`` has words and every one belongs to a backchannel phrase."""
        if text != self._only[0]:
            self._only = (text, self._only_backchannel(text))
        return self._only[1]

    def _only_backchannel(self, text: str) -> bool:
        words = _backchannel_words(text)
        if not words:
            return False
        i = 0
        while i < len(words):
            for size in range(min(self._longest, len(words) - i), 0, -1):
                if tuple(words[i:i + size]) in self._phrases:
                    i += size
                    break
            else:
                return False
        return True

    def content_words(self, text: str) -> int:
        """How many words of ``text`` are not part of a backchannel phrase."""
        if text != self._content[0]:
            self._content = (text, 0 if self.only_backchannel(text) else len(words_of(text)))
        return self._content[1]


@dataclass(frozen=True)
class TurnSettings:
    """Per-agent endpointing (from ``AgentSettings``)."""

    endpointing_ms: int = 600
    max_wait_ms: int = 2500
    backchannels: tuple[str, ...] = DEFAULT_BACKCHANNELS

    @property
    def utterance_end_ms(self) -> int:
        """The silence that ends a turn once the recogniser has ended the utterance."""
        return self.endpointing_ms // 2


@dataclass(frozen=True)
class Flush:
    """Ask the recogniser to finalise what it has heard (the caller has gone quiet)."""


@dataclass(frozen=True)
class TurnEnd:
    """The caller's turn is over."""

    text: str
    reason: Reason
    speech_end_ms: int  # audio time the caller stopped speaking
    ended_ms: int  # audio time the turn was declared over
    stt_final_ms: int  # audio time from speech end to the last final (0 if it came before)
    started_ms: int  # audio time the turn's first speech began
    revises: bool = False  # replaces the turn before, which ended at max wait on fewer words

    @property
    def eou_delay_ms(self) -> int:
        """End-of-utterance delay: silence waited before declaring the turn over."""
        return self.ended_ms - self.speech_end_ms


@dataclass
class _Turn:
    started_ms: int
    finals: list[str] = field(default_factory=list)
    partial: str = ""  # latest partial not yet covered by a final
    final_at_ms: int = 0
    stt_ended: bool = False  # the recogniser said the utterance is over
    flushed: bool = False
    heard_again_ms: int = 0  # audio time a new recogniser began hearing it again (a switch)


class TurnDetector:
    """See the module docstring. One per call."""

    def __init__(self, settings: TurnSettings | None = None) -> None:
        self.settings = settings or TurnSettings()
        self.backchannels = Backchannels(self.settings.backchannels)
        self._turn: _Turn | None = None
        self._speaking = False
        self._speech_end_ms = 0
        self.dropped_backchannels = 0
        self._late = False  # the last turn ended at max wait
        self._spoke_again_ms = math.inf  # audio time the caller began speaking after it
        self.late_results = 0  # partials and finals that came for such a turn
        self._late_turn: TurnEnd | None = None  # that turn (or its latest revision)
        self._late_finals: list[str] = []  # its finals, those before its end included
        self._late_final_ms = 0  # audio time of the last late final
        self._revision_due = False  # late finals came and the recogniser ended the utterance
        self._revision_decided = False  # it did, and the late words revised the turn, or not

    @property
    def in_turn(self) -> bool:
        """Whether the caller has started a turn that has not ended yet."""
        return self._turn is not None

    @property
    def turn_started_ms(self) -> int | None:
        """Audio time the open turn began, if one is open."""
        return None if self._turn is None else self._turn.started_ms

    @property
    def text(self) -> str:
        """What the open turn has said so far (finals, then the pending partial)."""
        if self._turn is None:
            return ""
        return " ".join([*self._turn.finals, self._turn.partial]).strip()

    @property
    def revisable_started_ms(self) -> int | None:
        """Audio time the turn that ended at max wait began, while late words may revise it.

        Until the recogniser has ended the utterance after it (the revision, if any, is out)
        or the caller has spoken again (none comes after that). Counted until the next turn
        instead, a caller who said nothing more held a successor's resume point before it for
        the rest of the call.
        """
        late = self._late_turn
        return late.started_ms if late and self.late and not self._revision_decided else None

    @property
    def late(self) -> bool:
        """Whether a result of unknown timing belongs to the turn that ended at max wait."""
        return self.late_for(math.inf)

    def late_for(self, heard_ms: float) -> bool:
        """Whether a result for the audio up to ``heard_ms`` is the max-wait turn's late words.

        It is until the caller speaks again, and after that if its audio came before.
        """
        return self._late and heard_ms <= self._spoke_again_ms

    def speech_started(self, at_ms: int) -> None:
        """The VAD heard the caller begin speaking."""
        self._speaking = True
        if self._late:
            self._spoke_again_ms = min(self._spoke_again_ms, at_ms)
        if self._turn is None:
            self._turn = _Turn(started_ms=at_ms)
        self._turn.stt_ended = False
        self._turn.flushed = False

    def speech_stopped(self, at_ms: int) -> None:
        """The VAD heard the caller stop (``at_ms`` is the end of the last speech frame)."""
        self._speaking = False
        self._speech_end_ms = at_ms

    def partial(self, text: str) -> None:
        """An interim hypothesis of the current utterance."""
        if self.late:
            self.late_results += 1
            return
        if text.strip():
            if self._turn is None:  # the recogniser heard speech the VAD missed
                self._turn = _Turn(started_ms=self._speech_end_ms)
            self._turn.partial = text.strip()

    def final(self, text: str, now_ms: int, *, speech_final: bool = False,
              heard_ms: float = math.inf) -> None:
        """A stable segment; ``speech_final`` if the recogniser also ended the utterance.

        ``heard_ms``: audio time its words end (unknown: now). An empty one (no words in that
        audio after all) retracts the pending partial.
        """
        if self.late_for(heard_ms):
            if text.strip():
                self.late_results += 1
                self._late_finals.append(text.strip())
                self._late_final_ms = now_ms
            if self._turn is not None:  # results come in audio order: its partial was this
                self._turn.partial = ""
            self._revision_due = speech_final or self._revision_due
            return
        if text.strip():
            if self._turn is None:
                self._turn = _Turn(started_ms=self._speech_end_ms)
            self._turn.finals.append(text.strip())
            self._turn.final_at_ms = now_ms
        if self._turn is not None:
            self._turn.partial = ""
            self._turn.stt_ended = self._turn.stt_ended or speech_final

    def utterance_end(self, heard_ms: float = math.inf) -> None:
        """The recogniser's silence-based end of utterance, after words ending at ``heard_ms``."""
        if self.late_for(heard_ms):
            self._revision_due = True
        elif self._turn is not None:
            self._turn.stt_ended = True

    def poll(self, now_ms: int, *, agent_speaking: bool | Callable[[], bool] = False,
             ) -> Flush | TurnEnd | None:
        """Called each frame with the audio clock; see the module docstring.

        ``agent_speaking`` may be a callable, asked only when a turn of backchannels ends
        (called every frame, working out whether the agent speaks cost more than the poll).
        """
        turn = self._turn
        if turn is None or self._speaking:
            return self._revision(now_ms) if self._revision_due and self.late else None
        silence = now_ms - self._speech_end_ms
        # The recogniser's time to catch up: from the speech's end, or from when a new one
        # began hearing the turn replayed (recognition_restarted).
        waited = now_ms - max(self._speech_end_ms, turn.heard_again_ms)
        finals = " ".join(turn.finals).strip()
        settings = self.settings
        only_backchannel = self.backchannels.only_backchannel(finals or turn.partial)
        factor = 2 if only_backchannel else 1
        caught_up = bool(finals) and not turn.partial
        if caught_up and (silence >= settings.endpointing_ms * factor or (
                turn.stt_ended and silence >= settings.utterance_end_ms * factor)):
            return self._end(finals, "utterance_end" if turn.stt_ended else "silence", now_ms,
                             agent_speaking=agent_speaking, only_backchannel=only_backchannel)
        if waited >= settings.max_wait_ms:
            text = " ".join([finals, turn.partial]).strip()
            if not text:  # a noise with no words: no turn
                self._turn = None
                return None
            return self._end(text, "max_wait", now_ms, agent_speaking=agent_speaking,
                             only_backchannel=self.backchannels.only_backchannel(text))
        if silence >= settings.endpointing_ms and not turn.flushed and not caught_up:
            turn.flushed = True
            return Flush()
        return None

    def _revision(self, now_ms: int) -> TurnEnd | None:
        """The late turn again with its late finals, if they say more than it did."""
        self._revision_due, self._revision_decided = False, True
        late = self._late_turn
        text = " ".join(self._late_finals)
        if late is None or len(words_of(text)) <= len(words_of(late.text)) or (
                self.backchannels.only_backchannel(text)):
            return None
        self._late_turn = TurnEnd(
            text, "utterance_end", late.speech_end_ms, now_ms,
            max(0, self._late_final_ms - late.speech_end_ms), late.started_ms, revises=True)
        return self._late_turn

    def recognition_restarted(self, now_ms: int = 0, *, late_replayed: bool = False) -> None:
        """A new recogniser hears the open turn again from its start (a provider switch).

        What the old one made of it is forgotten: the new one's results cover the same words,
        and kept, they came twice ("I'd like to book a table. I'd like to book a table. On
        Friday."). A flush already asked of the old one is asked of the new one (at once),
        and the max wait for its words counts from ``now_ms`` (when it began hearing it): counted
        from the speech's end, a switch that took seconds (a reopen's backoff) left the turn
        past it, and it ended at once on the new recogniser's first partial, its final then
        a revision (the brain answered a fragment and was cancelled).

        ``late_replayed``: no turn is open, and the new one hears the turn that ended at max
        wait again instead, its late words still owed: its finals so far are forgotten likewise
        (the new one's cover the whole turn), and the revision comes of the new one's.
        """
        if late_replayed and self._late_turn is not None and not self._revision_decided:
            self._late_finals.clear()
            self._revision_due = False
        turn = self._turn
        if turn is not None:
            turn.finals.clear()
            turn.partial, turn.final_at_ms = "", 0
            turn.stt_ended = turn.flushed = False
            turn.heard_again_ms = now_ms

    def reset(self) -> None:
        """Forget the open turn (e.g. after a DTMF or a barge-in took it over)."""
        self._turn = None

    def turn_of_keys(self) -> None:
        """A turn of key presses ended: late words no longer revise the turn before it.

        That turn has been answered past (the keys came after it), and a revision would replace
        the keys' turn rather than it. Late words are still counted and then dropped.
        """
        self._late_turn, self._revision_due = None, False

    def _end(self, text: str, reason: Reason, now_ms: int, *,
             agent_speaking: bool | Callable[[], bool], only_backchannel: bool
             ) -> TurnEnd | None:
        turn = self._turn
        assert turn is not None
        self._turn = None
        self._late, self._spoke_again_ms = reason == "max_wait", math.inf
        self._late_turn, self._late_finals, self._revision_due = None, list(turn.finals), False
        self._revision_decided = False
        if only_backchannel and (
                agent_speaking() if callable(agent_speaking) else agent_speaking):
            self.dropped_backchannels += 1
            return None
        stt_final_ms = max(0, turn.final_at_ms - self._speech_end_ms) if turn.finals else 0
        end = TurnEnd(text, reason, self._speech_end_ms, now_ms, stt_final_ms, turn.started_ms)
        if self._late:
            self._late_turn = end
        return end
