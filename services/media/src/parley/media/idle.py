"""Idle handling: when to ask a silent caller whether they are there, and when to hang up.

Pure state on the call's audio clock (milliseconds of inbound audio, as the turn detector
uses), so a dead line whose carrier keeps streaming silence is noticed like any other. The
session ticks the clock with whether anything is going on: the caller speaking or in a turn,
a caller turn whose answer is not over yet (the brain still working — a slow tool, an approval
— or its audio still to play), or agent audio queued or playing. Only the silence in between
counts (:attr:`IdleClock.silent_ms`).

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
