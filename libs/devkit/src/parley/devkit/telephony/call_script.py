"""What the Twilio-side party says and does on a stream, and when.

A :class:`CallScript` lists utterances (8 kHz µ-law), key presses and when to hang up. By default
each utterance waits for its turn like a polite caller: until the agent has answered the previous
one (or greeted) and then been quiet for ``pause`` seconds — or, if the agent never starts,
``reply_timeout`` seconds. ``at`` starts an utterance at a fixed time and ``over_agent_after``
starts it that long after the agent began answering: both speak over the agent if it is talking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from parley.devkit.telephony.audio_codec import ULAW_SILENCE, read_wav_as_ulaw
from parley.devkit.telephony.twilio_protocol import FRAME_BYTES

SILENCE_FRAME = bytes([ULAW_SILENCE]) * FRAME_BYTES
_EPSILON = 1e-6  # frame times are sums of 20 ms steps: compare with a little slack


@dataclass(frozen=True, kw_only=True)
class Utterance:
    """One thing the caller says: 8 kHz µ-law audio and when to start it."""

    audio: bytes
    label: str = "utterance"
    at: float | None = None  # seconds after the stream started, whatever is playing
    over_agent_after: float | None = None  # seconds after the agent began answering
    pause: float = 0.5  # quiet after the agent's answer before speaking

    @classmethod
    def from_wav(cls, path: str | Path, *, at: float | None = None,
                 over_agent_after: float | None = None, pause: float = 0.5) -> Utterance:
        """An utterance read from a WAV file of any format (converted to 8 kHz µ-law)."""
        return cls(audio=read_wav_as_ulaw(path), label=Path(path).name, at=at,
                   over_agent_after=over_agent_after, pause=pause)

    @property
    def seconds(self) -> float:
        """Length of the audio."""
        return len(self.audio) / 8000


@dataclass(frozen=True, kw_only=True)
class KeyPress:
    """A DTMF digit pressed ``at`` seconds after the stream started."""

    digit: str
    at: float


@dataclass(frozen=True, kw_only=True)
class CallScript:
    """The Twilio-side party's script for one stream."""

    utterances: tuple[Utterance, ...] = ()
    key_presses: tuple[KeyPress, ...] = ()
    hangup_after: float | None = None  # seconds after the stream started
    hang_up_when_done: bool = True  # once the last utterance has been answered
    reply_timeout: float = 10.0  # how long to wait for the agent to start answering


@dataclass(frozen=True)
class Frame:
    """20 ms of caller audio and the utterance it starts or ends, if any."""

    audio: bytes
    started: Utterance | None = None
    ended: Utterance | None = None


class Speaker:
    """Turns a script into a frame every 20 ms, following the agent's playback.

    Times are seconds since the stream started. Tell it when agent audio starts and stops
    playing (:meth:`agent_started`, :meth:`agent_stopped`); ask it for the next :meth:`frame`.
    """

    def __init__(self, script: CallScript) -> None:
        self._script = script
        self._pending = deque(script.utterances)
        self._presses = deque(sorted(script.key_presses, key=lambda press: press.at))
        self._current: Utterance | None = None
        self._offset = 0
        self._spoke_until = 0.0  # end of our last utterance (or the stream's start)
        self._answer_started: float | None = None  # agent began answering since then
        self._quiet_since: float | None = 0.0  # agent audio last stopped (None: playing)

    def agent_started(self, at: float) -> None:
        """Agent audio began playing."""
        self._quiet_since = None
        if self._current is None and self._answer_started is None:
            self._answer_started = at

    def agent_stopped(self, at: float) -> None:
        """Agent audio stopped playing (finished or cleared)."""
        self._quiet_since = at

    def key_presses_due(self, now: float) -> list[KeyPress]:
        """Key presses whose time has come."""
        due = []
        while self._presses and self._presses[0].at <= now + _EPSILON:
            due.append(self._presses.popleft())
        return due

    def frame(self, now: float) -> Frame:
        """The caller's next 20 ms."""
        started = None
        if self._current is None and self._pending and self._may_speak(self._pending[0], now):
            self._current, self._offset = self._pending.popleft(), 0
            started = self._current
        if self._current is None:
            return Frame(SILENCE_FRAME)
        utterance = self._current
        audio = utterance.audio[self._offset : self._offset + FRAME_BYTES]
        self._offset += FRAME_BYTES
        ended = None
        if self._offset >= len(utterance.audio):
            self._current, ended = None, utterance
            self._spoke_until, self._answer_started = now, None
        return Frame(audio.ljust(FRAME_BYTES, bytes([ULAW_SILENCE])), started, ended)

    def finished(self, now: float) -> bool:
        """Every utterance has been said and the last one answered (or not, after the timeout)."""
        if self._current is not None or self._pending:
            return False
        return self._answered(now, pause=0.0)

    def _may_speak(self, utterance: Utterance, now: float) -> bool:
        if utterance.at is not None:
            return now + _EPSILON >= utterance.at
        if utterance.over_agent_after is not None and self._answer_started is not None:
            return now + _EPSILON >= self._answer_started + utterance.over_agent_after
        return self._answered(now, utterance.pause)

    def _answered(self, now: float, pause: float) -> bool:
        if self._answer_started is None:
            return now - self._spoke_until + _EPSILON >= self._script.reply_timeout
        return self._quiet_since is not None and now - self._quiet_since + _EPSILON >= pause
