"""What the caller has actually heard of the agent, and when the caller barges in.

:class:`AgentTurnAudio` keeps one agent turn's outbound audio: the 20 ms frames, where each
clause ends and the words with their times on the turn's timeline (from TTS word timestamps). It
decides where marks go — after the first frame (playback has begun), every ``MARK_EVERY`` frames
and after each clause — and learns from the carrier's echoes (Twilio ``mark`` / Plivo
``playedStream``, relayed by the gateway as ``agent.speech.progress``) how far playback really
got. The played position is the last echoed mark plus the time since that echo, never past the
next mark not yet echoed: truth from the carrier, not from "sent at real-time pace". Not waited
for without end, though: audio sent has played, at the latest, its own length after it was sent
(or after the last echo, if that is later) and ``ECHO_GRACE_S`` more; echoes that have not come
by then never will (a carrier that does not echo marks, a Plivo account without
``playedStream``, an echo lost on the way), and the turn no longer counts as playing.

Mark names are ``<turn_id>:<seq>`` with ``seq = generation * 1_000_000 + frame``; a resume after
a false interruption starts a new generation, so the echoes of marks flushed by ``clear`` (which
Twilio sends back) are told apart and ignored.

:class:`BargeIn` is the policy: interruption mode ``none|dtmf|speech|any`` and sensitivity
``low|medium|high``. Caller speech over agent audio for ``pause_ms`` pauses the agent (the
gateway's ``clear``); ``min_words`` content words (backchannels do not count) confirm the
interruption; no words within ``resume_after_s`` — or only a backchannel — resumes the rest of
the agent's audio from where it was cut, and the speech that caused the false alarm does not
pause it again (words still interrupt). Words that come only after the caller stopped (a
recogniser slower than the speech) still interrupt if that speech was over the agent's audio and
the agent is still speaking. Both classes are pure: the session feeds them time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parley.media.providers.base import WordTiming

FRAME_MS = 20
MARK_EVERY = 25  # frames: a mark each 500 ms of audio between clause ends
GENERATION = 1_000_000
# How late a mark's echo may be past the audio's own length (the carrier's buffering and
# latency, the gateway's hop) before it is taken as never coming.
ECHO_GRACE_S = 2.0

Mode = Literal["none", "dtmf", "speech", "any"]
Sensitivity = Literal["low", "medium", "high"]


def mark_seq(generation: int, frame: int) -> int:
    """The ``seq`` a mark carries: generation and frame index in one integer."""
    return generation * GENERATION + frame


@dataclass
class AgentTurnAudio:
    """One agent turn's outbound audio and how much of it has played."""

    turn_id: str
    frames: list[bytes] = field(default_factory=list)
    clause_ends: list[int] = field(default_factory=list)  # frame index after each clause
    words: list[WordTiming] = field(default_factory=list)  # on the turn's timeline, seconds
    text_done: bool = False  # every clause has been synthesised
    generation: int = 0
    sent: int = 0  # frames of this generation's run published so far (absolute index)
    played_frames: int = 0  # confirmed by an echo
    echoed_at: float | None = None  # monotonic time of that echo
    pending_marks: list[int] = field(default_factory=list)  # frame indices marked, not echoed
    cut_frames: int | None = None  # where a pause or interruption cut playback
    # First frame of the current run (0, or the cut it resumed from), or where sending went on
    # after a pause (see :meth:`paused`) or after the carrier ran dry (see
    # :meth:`take_unsent`): a mark goes after it.
    run_start: int = 0
    finished: bool = False  # the last mark was echoed: everything played
    # The gateway refused a mark of this run: the carrier's socket is closed, so nothing sent
    # to it plays any more and none of the run's marks will be echoed (see :meth:`refused`).
    echoes_lost: bool = False
    # When the audio of this run sent so far will have played if the carrier plays it as sent,
    # back to back (monotonic; None before anything is sent with a time): see :meth:`overdue`.
    sent_plays_until: float | None = None

    @property
    def duration_ms(self) -> int:
        """Audio synthesised so far."""
        return len(self.frames) * FRAME_MS

    def add_frames(self, frames: list[bytes], words: list[WordTiming], *,
                   clause_start_s: float) -> None:
        """Append frames of the clause that began at ``clause_start_s`` on the turn timeline."""
        self.words.extend(WordTiming(w.text, w.start + clause_start_s, w.end + clause_start_s)
                          for w in words)
        self.frames.extend(frames)

    def whole_words_since(self, start_s: float) -> list[WordTiming]:
        """The words from ``start_s`` on whose audio is all here; a word cut short is forgotten.

        For a synthesiser that broke mid-clause: the next one says the rest, from that word.
        """
        words, here_s = self.words, (len(self.frames) + 1) * FRAME_MS / 1000
        while words and words[-1].start >= start_s and words[-1].end > here_s:
            words.pop()
        first = len(words)
        while first and words[first - 1].start >= start_s:
            first -= 1
        return words[first:]

    def end_clause(self) -> None:
        """The clause being added is complete: a mark goes after its last frame."""
        if self.frames and (not self.clause_ends or self.clause_ends[-1] != len(self.frames)):
            self.clause_ends.append(len(self.frames))

    def mark_after(self, frame: int) -> bool:
        """Whether a mark goes after frame index ``frame`` (0-based) when it is sent.

        After the first frame of a run (playback has begun), every ``MARK_EVERY`` frames, after
        each clause and after the last frame.
        """
        n = frame + 1  # frames played once this mark is reached
        return n == self.run_start + 1 or n % MARK_EVERY == 0 or n in self.clause_ends or (
            self.text_done and n == len(self.frames))

    def take_unsent(self, now: float | None = None, *,
                    queued_until: float | None = None) -> list[tuple[int, bytes, int | None]]:
        """Frames ready to publish as ``(index, frame, mark seq or None)``; marks them sent.

        If by ``now`` the carrier has played all it was sent (a wait for the next clause, or a
        synthesiser slower than the audio), a mark goes after the first frame sent now, as
        after a pause: the wait is not playback, and last echo + time since counted it as
        played, up to the next mark (words not yet heard taken as heard). ``queued_until``:
        when the call's other audio sent before (an earlier turn's) will have played, the
        carrier playing what it is sent in order: these frames play after it.
        """
        if now is not None and self.echoed_at is not None and self.sent < len(self.frames) and (
                self.position_ms(now) >= self.sent * FRAME_MS):
            self.run_start = self.sent
        out: list[tuple[int, bytes, int | None]] = []
        while self.sent < len(self.frames):
            index = self.sent
            seq = None
            if self.mark_after(index):
                seq = mark_seq(self.generation, index + 1)
                self.pending_marks.append(index + 1)
            out.append((index, self.frames[index], seq))
            self.sent += 1
        if out and now is not None:
            # after what is queued, if any (this turn's, and other turns' sent before it)
            start = max(now, self.sent_plays_until or now, queued_until or now)
            self.sent_plays_until = start + len(out) * FRAME_MS / 1000
        return out

    def paused(self) -> None:
        """Sending stops here for a while (the session's lease is unconfirmed).

        A mark goes after the next frame sent: until its echo, the position is capped there
        (last echo + time since would count the pause as played), and the echo says when the
        caller hears the turn again.
        """
        self.run_start = self.sent

    def last_mark_missing(self) -> bool:
        """The final frame went out before the text was known to be done: needs a mark.

        So does a run resumed at the very end (nothing left to send with a mark), and a turn
        whose last frame was echoed before its text was done: neither would ever finish.
        """
        return self.text_done and self.sent == len(self.frames) and bool(self.frames) and (
            not self.pending_marks or self.pending_marks[-1] != len(self.frames)) and (
            not self.finished)

    def echo(self, seq: int, now: float) -> bool:
        """A mark echoed; returns True if it belongs to the current run (else it is stale)."""
        generation, frames = divmod(seq, GENERATION)
        if generation != self.generation or self.cut_frames is not None:
            return False
        if frames >= self.played_frames:
            self.played_frames = frames
            self.echoed_at = now
        self.pending_marks = [m for m in self.pending_marks if m > frames]
        if self.text_done and frames >= len(self.frames):
            self.finished = True
        return True

    def refused(self) -> None:
        """The gateway refused a mark: the call's socket is closed, and no echo will come.

        The run's marks are forgotten and its audio is no longer playing: waited for, they kept
        the turn playing for ever (the caller's silence never counted again, the turn was
        never done with), though the call goes on (its stream restarted) or is ending.
        """
        self.pending_marks = []
        self.echoes_lost = True

    def overdue(self, now: float) -> bool:
        """Audio sent has had time to play, with ``ECHO_GRACE_S`` to spare, and is not echoed.

        Its length from when it was sent (queued behind what was sent before it), or from the
        last echo if that says the carrier started later. Waited for instead, a carrier that
        never echoes kept the turn playing for ever: a caller turn held for it was never
        published, the caller's silence never counted, barge-in took the agent as speaking.
        """
        plays_until = self.plays_until()
        if plays_until is None or self.sent <= self.played_frames:
            return False
        return now >= plays_until + ECHO_GRACE_S

    def plays_until(self) -> float | None:
        """When the audio sent so far will have played (monotonic); None if nothing was sent.

        From when it was sent (queued behind what was sent before it), or from the last echo
        if that says the carrier started later.
        """
        if self.sent_plays_until is None:
            return None
        if self.echoed_at is None:
            return self.sent_plays_until
        return max(self.sent_plays_until,
                   self.echoed_at + (self.sent - self.played_frames) * FRAME_MS / 1000)

    @property
    def started(self) -> bool:
        """The carrier has begun playing this turn (the first mark came back)."""
        return self.echoed_at is not None

    def playing(self, now: float) -> bool:
        """Whether agent audio of this turn is (or is about to be) audible right now."""
        if self.finished or self.echoes_lost or self.cut_frames is not None or not self.frames:
            return False
        if self.overdue(now):
            return False
        return self.sent > self.played_frames or self.position_ms(now) < self.sent * FRAME_MS

    def position_ms(self, now: float) -> int:
        """How far playback has got: last echo + time since, capped by the next mark.

        Before this run's first echo: where the run starts (0, or the cut it resumed from).
        """
        if self.echoed_at is None:
            return self.played_frames * FRAME_MS
        position = self.played_frames * FRAME_MS + round((now - self.echoed_at) * 1000)
        cap = self.pending_marks[0] if self.pending_marks else self.sent
        return min(position, cap * FRAME_MS, self.sent * FRAME_MS)

    def heard_text(self, position_ms: int) -> str:
        """The words the caller heard completely by ``position_ms``."""
        limit = position_ms / 1000 + 0.02
        return " ".join(w.text for w in self.words if w.end <= limit)

    def cut(self, now: float) -> int:
        """Stop playback here (pause or interruption); returns the cut position in frames."""
        if self.cut_frames is None:
            self.cut_frames = self.position_ms(now) // FRAME_MS
        return self.cut_frames

    def resume(self) -> None:
        """Play on from the cut: a new generation re-sends the frames after it."""
        assert self.cut_frames is not None
        self.generation += 1
        self.sent = self.run_start = self.cut_frames
        self.played_frames = self.cut_frames
        self.echoed_at = None
        self.pending_marks = []
        self.echoes_lost = False
        self.sent_plays_until = None  # the carrier's queue was cleared at the cut
        self.cut_frames = None


@dataclass(frozen=True)
class Thresholds:
    """How much caller speech pauses the agent and how many words confirm an interruption."""

    pause_ms: int
    min_words: int


SENSITIVITY: dict[str, Thresholds] = {
    "high": Thresholds(pause_ms=200, min_words=1),
    "medium": Thresholds(pause_ms=400, min_words=1),
    "low": Thresholds(pause_ms=700, min_words=2),
}


@dataclass(frozen=True)
class Pause:
    """Stop the agent's audio now (clear) and wait for words."""


@dataclass(frozen=True)
class Interrupt:
    """The caller took the turn: the agent's turn ends at the cut."""


@dataclass(frozen=True)
class Resume:
    """False alarm: play the rest of the agent's audio."""


class BargeIn:
    """The interruption policy for one call (see the module docstring)."""

    def __init__(self, mode: Mode = "speech", sensitivity: Sensitivity = "medium", *,
                 resume_after_s: float = 1.5) -> None:
        self.mode = mode
        self.thresholds = SENSITIVITY[sensitivity]
        self.resume_after_s = resume_after_s
        self.paused_at: float | None = None
        self.false_alarms = 0
        # The caller's speech went on through a resume without words (noise, a cough, the TV):
        # it does not pause the agent again; words still interrupt, and so does new speech.
        self._false_alarm_speech = False
        # The caller's open turn was spoken over the agent's audio (its words may come late).
        self._overlapped = False

    @property
    def by_speech(self) -> bool:
        """Whether caller speech can interrupt."""
        return self.mode in ("speech", "any")

    @property
    def by_dtmf(self) -> bool:
        """Whether a key press interrupts."""
        return self.mode in ("dtmf", "any")

    def on_speech(self, speech_ms: int, content_words: int, *, agent_playing: bool,
                  now: float) -> Pause | Interrupt | None:
        """Caller speech has lasted ``speech_ms`` with ``content_words`` recognised so far."""
        if not self.by_speech:
            return None
        if agent_playing:
            self._overlapped = True
        if self.paused_at is not None:
            if content_words >= self.thresholds.min_words:
                self.paused_at = None
                return Interrupt()
            return None
        if not agent_playing:
            return None
        if content_words >= self.thresholds.min_words:
            return Interrupt()
        if speech_ms >= self.thresholds.pause_ms and not self._false_alarm_speech:
            self.paused_at = now
            return Pause()
        return None

    def speech_started(self, *, new_turn: bool = True) -> None:
        """The caller began a new stretch of speech (what follows a false alarm counts again).

        ``new_turn``: it opens a new caller turn (not a continuation of the open one).
        """
        self._false_alarm_speech = False
        if new_turn:
            self._overlapped = False

    def on_words_after_speech(self, content_words: int, *,
                              agent_playing: bool) -> Interrupt | None:
        """Words that came after the caller stopped (a recogniser slower than the speech).

        They interrupt if the agent is still speaking and the caller's turn was spoken over it:
        the caller did talk over the agent; the words only say so late.
        """
        if self.by_speech and self._overlapped and agent_playing and (
                content_words >= self.thresholds.min_words):
            return Interrupt()
        return None

    def on_dtmf(self, *, agent_playing: bool) -> Interrupt | None:
        """A key press while the agent speaks."""
        if self.by_dtmf and (agent_playing or self.paused_at is not None):
            self.paused_at = None
            return Interrupt()
        return None

    def pause_over(self) -> None:
        """The paused agent turn ended otherwise (a newer turn replaced it): nothing resumes."""
        self.paused_at = None

    def tick(self, now: float, *, only_backchannel: bool = False,
             caller_speaking: bool = True) -> Resume | None:
        """While paused, decide whether to resume.

        Resume after ``resume_after_s`` without words, or at once when what was said is only a
        backchannel and the caller has stopped.
        """
        if self.paused_at is None:
            return None
        if now - self.paused_at >= self.resume_after_s or (
                only_backchannel and not caller_speaking):
            self.paused_at = None
            self.false_alarms += 1
            self._false_alarm_speech = caller_speaking
            return Resume()
        return None
