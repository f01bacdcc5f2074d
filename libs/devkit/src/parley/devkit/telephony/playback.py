"""Twilio's outbound playback semantics, as a pure class with an injected clock.

What a gateway sends (``media``, ``mark``, ``clear``) is queued and "plays" at real time, 8000
µ-law bytes per second, back to back: audio that arrives while the line is idle starts at once;
audio that arrives while something plays starts when the queue before it finishes. A mark is
echoed when all audio queued before it has finished playing (at once if nothing is queued).
``clear`` cuts the audio playing now, drops everything queued and echoes every pending mark
immediately, as Twilio does. What was actually played, and when, is kept for the call's WAV.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

BYTES_PER_SECOND = 8000


@dataclass(frozen=True)
class AudioStarted:
    """Agent audio began playing on an idle line."""

    at: float


@dataclass(frozen=True)
class AudioStopped:
    """The queue ran dry (or was cleared): the line is idle again."""

    at: float


@dataclass(frozen=True)
class MarkReached:
    """A mark to echo: the audio before it has played (or ``cleared``: it was flushed)."""

    at: float
    name: str
    cleared: bool = False


@dataclass(frozen=True)
class Cleared:
    """``clear`` was applied; ``dropped_seconds`` of queued audio never played."""

    at: float
    dropped_seconds: float


PlaybackEvent = AudioStarted | AudioStopped | MarkReached | Cleared


@dataclass
class _Chunk:
    start: float
    audio: bytes

    @property
    def end(self) -> float:
        return self.start + len(self.audio) / BYTES_PER_SECOND


class Playback:
    """The audio queue of one stream. ``clock()`` returns seconds (any origin, non-decreasing).

    Feed it with :meth:`enqueue_audio`, :meth:`enqueue_mark` and :meth:`clear`; call :meth:`poll`
    regularly to collect what happened since (marks to echo, audio started/stopped), in time
    order. :meth:`played` is the audio that has been heard so far, placed at the time it played.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._chunks: list[_Chunk] = []  # every chunk ever queued, cut to what played on clear
        self._marks: deque[tuple[float, str]] = deque()  # (due, name), due non-decreasing
        self._tail = float("-inf")  # when everything queued so far finishes playing
        self._run_start: float | None = None  # start of the current run of audio, if any
        self._announced = False  # AudioStarted emitted for the current run
        self._events: list[PlaybackEvent] = []

    def enqueue_audio(self, audio: bytes) -> None:
        """Queue agent audio (µ-law, 8 kHz) behind what is already queued."""
        if not audio:
            return
        now = self._advance()
        start = max(now, self._tail)
        if self._run_start is None:
            self._run_start, self._announced = start, False
        self._chunks.append(_Chunk(start, audio))
        self._tail = start + len(audio) / BYTES_PER_SECOND
        self._advance()

    def enqueue_mark(self, name: str) -> None:
        """Queue a mark; it is echoed when the audio queued before it has played."""
        now = self._advance()
        self._marks.append((max(now, self._tail), name))
        self._advance()

    def clear(self) -> list[PlaybackEvent]:
        """Flush the queue now; returns the events, including every pending mark to echo."""
        now = self._advance()
        dropped = 0.0
        kept: list[_Chunk] = []
        for chunk in self._chunks:
            if chunk.end <= now:
                kept.append(chunk)
            elif chunk.start < now:
                played = round((now - chunk.start) * BYTES_PER_SECOND)
                dropped += (len(chunk.audio) - played) / BYTES_PER_SECOND
                kept.append(_Chunk(chunk.start, chunk.audio[:played]))
            else:
                dropped += len(chunk.audio) / BYTES_PER_SECOND
        self._chunks = kept
        events = self._take_events()
        events.append(Cleared(now, dropped))
        while self._marks:
            events.append(MarkReached(now, self._marks.popleft()[1], cleared=True))
        if self._run_start is not None:  # always announced by now: a run starts when queued
            events.append(AudioStopped(now))
        self._tail, self._run_start = now, None
        return events

    def poll(self) -> list[PlaybackEvent]:
        """What happened up to now, oldest first."""
        self._advance()
        return self._take_events()

    def finish(self) -> None:
        """The stream ended: nothing queued plays any more (no marks are echoed)."""
        now = self._advance()
        self._chunks = [
            _Chunk(chunk.start, chunk.audio[: round((now - chunk.start) * BYTES_PER_SECOND)])
            for chunk in self._chunks if chunk.start < now
        ]
        self._marks.clear()
        self._tail, self._run_start = now, None

    @property
    def playing(self) -> bool:
        """Whether agent audio is playing now."""
        return self._clock() < self._tail

    @property
    def queued_seconds(self) -> float:
        """Audio queued but not yet played, in seconds."""
        return max(0.0, self._tail - self._clock())

    def played(self) -> list[tuple[float, bytes]]:
        """(start time, audio) of everything heard so far, in the clock's time."""
        now = self._clock()
        return [
            (chunk.start, chunk.audio[: round((now - chunk.start) * BYTES_PER_SECOND)])
            for chunk in self._chunks if chunk.start < now
        ]

    def _advance(self) -> float:
        """Record what happened up to now; returns now."""
        now = self._clock()
        timed: list[tuple[float, int, PlaybackEvent]] = []
        if self._run_start is not None and not self._announced and self._run_start <= now:
            self._announced = True
            timed.append((self._run_start, 0, AudioStarted(self._run_start)))
        while self._marks and self._marks[0][0] <= now:
            due, name = self._marks.popleft()
            timed.append((due, 1, MarkReached(due, name)))
        if self._run_start is not None and self._tail <= now:
            timed.append((self._tail, 2, AudioStopped(self._tail)))
            self._run_start = None
        timed.sort(key=lambda item: (item[0], item[1]))
        self._events.extend(event for _, _, event in timed)
        return now

    def _take_events(self) -> list[PlaybackEvent]:
        events, self._events = self._events, []
        return events
