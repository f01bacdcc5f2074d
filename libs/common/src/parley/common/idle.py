"""Idle handling: when to ask a silent caller whether they are there, and when to hang up.

Whoever hears the call runs it: media on the call's audio clock (milliseconds of inbound audio,
as the turn detector uses, so a dead line whose carrier keeps streaming silence is noticed like
any other), the gateway's ConversationRelay bridge on the wall clock (Twilio hears managed
calls). Both emit ``caller.idle``; the brain answers it the same way.

:class:`IdleClock` is ticked with whether anything is going on: the caller speaking or in a turn,
a caller turn whose answer is not over yet (:class:`IdleState`: the brain still working — a slow
tool, an approval — or its audio still to play), or agent audio queued or playing. Only the
silence in between counts (:attr:`IdleClock.silent_ms`).

After ``prompt_ms`` of it the answer is "prompt" (once per silence), after ``hangup_ms``
"hangup" (once); the prompt's own audio pauses the count rather than restarting it, so the
hang-up comes ``hangup_ms`` of silence after the agent last spoke, not counting the prompt.
Caller speech, a key press, a caller turn or new agent audio other than the prompt start the
silence over (:meth:`IdleClock.reset`). 0 turns either off; a hang-up due no later than the
prompt comes without it.

A hang-up that worked ends the call, and one the caller answered starts the silence over; one
that failed otherwise (the gateway timed out or refused) leaves the line open and silent. So the
hang-up is asked for again after each further ``hangup_retry_ms`` of silence (its goodbye's audio
not counted, as the prompt's is not): a dead line is still hung up on, once the gateway obeys,
and a hang-up still under way (the tools service waits at most its command timeout, 5 s) is not
asked for twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .events import (
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechStarted,
    CallDtmf,
    CallerIdle,
    Event,
    SpeechStarted,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnUserEnded,
)

Action = Literal["prompt", "hangup"]


@dataclass(frozen=True)
class IdleSettings:
    """Per-agent idle timers (``AgentSettings.idle_prompt_s`` / ``idle_hangup_s``), in ms."""

    prompt_ms: int = 8000  # 0: never prompt
    hangup_ms: int = 30000  # 0: never hang up
    hangup_retry_ms: int = 15000  # a hang-up that did not end the call: the next, after this

    @property
    def enabled(self) -> bool:
        """Whether either timer is on."""
        return bool(self.prompt_ms or self.hangup_ms)


class IdleClock:
    """See the module docstring. One per call."""

    def __init__(self, settings: IdleSettings) -> None:
        self.settings = settings
        self.silent_ms = 0  # silence counted since the last reset
        self.prompted = False  # the prompt was asked for in this silence
        self.hangup_due_ms = settings.hangup_ms  # when (in silent_ms) the next hang-up is due
        self._last_ms: int | None = None

    def reset(self) -> None:
        """Someone spoke (or pressed a key): the silence starts over."""
        self.silent_ms = 0
        self.prompted = False
        self.hangup_due_ms = self.settings.hangup_ms

    def hung_up(self, at_ms: int) -> None:
        """A hang-up was asked for at ``at_ms`` of silence: the next is due a retry later."""
        self.prompted = True
        self.hangup_due_ms = max(self.hangup_due_ms, at_ms + self.settings.hangup_retry_ms)

    def tick(self, now_ms: int, *, busy: bool) -> Action | None:
        """The audio clock is at ``now_ms``; ``busy`` if something is going on now.

        The time since the last tick counts as silence unless ``busy`` (ticks come every
        100 ms or so). Returns what is due now, if anything.
        """
        last, self._last_ms = self._last_ms, now_ms
        if busy or last is None:
            return None
        self.silent_ms += max(0, now_ms - last)
        settings = self.settings
        if settings.hangup_ms and self.silent_ms >= self.hangup_due_ms:
            self.hung_up(self.silent_ms)
            return "hangup"
        if settings.prompt_ms and not self.prompted and self.silent_ms >= settings.prompt_ms:
            self.prompted = True
            return "prompt"
        return None


HAND_OFFS = frozenset({"end_call", "transfer_call"})
GREETING_TURN = "t0"  # the agent turn of the greeting


class IdleState:
    """A call's idle handling: the clock, the caller turn still to answer, the idle turns.

    The pending answer is the caller turn whose answer is not over: the brain has not completed
    it, or its audio is still to play (``unanswered``; the greeting's, ``t0``, when media says
    it). The idle turns are the agent turns of ``caller.idle`` (``i0``, ``i1``…): the n-th of a
    call has the same id whoever emits it, and a successor learns the ones before from the
    call's events (:meth:`observe`), so a take-over or a reconnect does not repeat one.
    """

    def __init__(self, settings: IdleSettings, *, unanswered: str = "") -> None:
        self.clock = IdleClock(settings)
        self.unanswered = unanswered
        self.latest = ""  # the latest caller turn
        self._ended: set[str] = set()  # the caller turns seen to end (each is awaited once)
        self._owed = 1  # the turn.completed events the brain still owes the unanswered turn
        # Utterances of it whose hand-off failed ("t3", then "t3.1" if the model tried again):
        # their last words are not the answer; the brain says more ("t3.1", "t3.2").
        self._failed: set[str] = set()
        self._hand_offs: dict[str, str] = {}  # end_call/transfer_call tool call → utterance
        self._cut_off: set[str] = set()  # caller turns whose answer the caller interrupted
        self.idle_turns: set[str] = set()
        self.idle_count = 0  # caller.idle events of the call so far

    def next_idle_turn(self) -> tuple[int, str]:
        """The ordinal and agent turn of the call's next ``caller.idle``, now taken."""
        number = self.idle_count
        self.idle_count += 1
        self.idle_turns.add(f"i{number}")
        return number, f"i{number}"

    def awaiting(self, turn_id: str) -> None:
        """The caller turn ``turn_id`` ended: pending until the brain has answered it.

        Once per turn: a successor that took the call over just after the turn ended detects it
        again from its resume point (the lease lags the events by up to a second), under the
        same id; JetStream drops that repeat, so no second completion comes to end it. Not only
        the latest: a turn of keys (``k<n>``, numbered apart) can have ended after it.
        """
        if turn_id in self._ended:
            return
        self._ended.add(turn_id)
        self.unanswered, self.latest, self._owed = turn_id, turn_id, 1
        self._failed.clear()

    def answered(self, turn_id: str, *, completed: bool = False, cut_off: bool = False) -> None:
        """Agent audio of ``turn_id`` is over (played or cut), or the brain completed the turn.

        The caller turn is then no longer pending, unless a hand-off of it failed and the brain
        still owes what it says about that: a turn completes once more than its hand-offs
        failed, and a failed hand-off's own last words ("Goodbye!", or those of a second one
        the model tried in ``t3.1``) are not that answer.
        ``cut_off``: the caller interrupted it, and the brain takes an interrupted turn up no
        more (it answers their next turn, if one comes: a key press makes none), so it is over.
        """
        caller_turn = turn_id.partition(".")[0]  # "t3.1" follows t3's failed hand-off
        if cut_off:
            self._cut_off.add(caller_turn)
        if caller_turn != self.unanswered:
            return
        if completed:
            self._owed -= 1
            if self._owed > 0:
                return
        elif turn_id in self._failed and not cut_off:
            return
        self.unanswered = ""

    def hand_off_seen(self, event: ToolRequested | ToolFailed) -> None:
        """A hand-off of the latest caller turn failed: the turn is pending again.

        The brain takes it up again (the caller hears why, in ``t<n>.1``) and completes it once
        more; until then the silence is the brain's, not the caller's. (A hand-off that worked
        ends the call or moves it on; an idle hang-up's turn, ``i<n>``, is not the caller's.)
        """
        if isinstance(event, ToolRequested):
            if event.name in HAND_OFFS:
                self._hand_offs[event.tool_call_id] = event.turn_id
            return
        speech = self._hand_offs.pop(event.tool_call_id, "")
        turn_id = speech.partition(".")[0]
        if not turn_id or turn_id != self.latest:
            return  # not a hand-off, or of a turn the caller has since followed with another
        if turn_id in self._cut_off:
            return  # refused as the caller interrupted its last words: the brain goes no further
        if self.unanswered == turn_id:
            self._owed += 1  # (failed before the turn's first completion was seen)
        else:
            self.unanswered, self._owed = turn_id, 1
        self._failed.add(speech)

    def seen(self, event: CallerIdle) -> None:
        """A caller.idle of the call: one's own, or one a predecessor emitted.

        Another's silence goes on where it was: what it asked for is not asked for again.
        """
        if event.turn_id in self.idle_turns:
            return
        self.idle_turns.add(event.turn_id)
        number = event.turn_id[1:]
        if number.isdigit():
            self.idle_count = max(self.idle_count, int(number) + 1)
        clock = self.clock
        clock.silent_ms = max(clock.silent_ms, round(event.silent_s * 1000))
        clock.prompted = True
        if event.action == "hangup":  # the next only if this one leaves the line silent
            clock.hung_up(round(event.silent_s * 1000))

    def observe(self, event: Event) -> None:
        """The idle state as one of the call's events leaves it.

        For a successor reading the call's past, and for the ConversationRelay bridge, which
        follows every event live; media handles its own speech and audio as they happen.
        """
        if isinstance(event, CallerIdle):
            self.seen(event)
        elif isinstance(event, SpeechStarted | CallDtmf):
            self.clock.reset()
        elif isinstance(event, TurnUserEnded):
            self.clock.reset()
            self.awaiting(event.turn_id)
        elif isinstance(event, AgentSpeechStarted):
            if event.turn_id not in self.idle_turns:
                self.clock.reset()
            if event.turn_id == GREETING_TURN:
                # A predecessor began the greeting: it is not voiced again, the carrier's echoes
                # of what is left of it match no turn of ours, and the brain completes no
                # greeting. Waited for, it would hold the idle clock for the rest of the call.
                self.answered(GREETING_TURN)
        elif isinstance(event, AgentSpeechFinished):
            self.answered(event.turn_id)
        elif isinstance(event, AgentSpeechInterrupted):
            self.answered(event.turn_id, cut_off=True)
        elif isinstance(event, TurnCompleted):
            self.answered(event.turn_id, completed=True)
        elif isinstance(event, ToolRequested | ToolFailed):
            self.hand_off_seen(event)
