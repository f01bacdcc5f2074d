"""Idle handling on managed (ConversationRelay) calls: a silent caller is prompted, then hung up on.

Media does not serve managed calls (Twilio hears and speaks them), so the bridge runs the idle
clock of :mod:`parley.common.idle` itself, on the wall clock, and emits the same
``caller.idle`` the brain answers on cascading calls (the agent's ``idle_prompt``, then its
``idle_goodbye`` and the hang-up).

What counts as going on, so not as the caller's silence:

- a caller turn whose answer is not over (:class:`~parley.common.idle.IdleState`, fed every
  event of the call: the brain has not completed it, or a failed hand-off's follow-up is owed);
- the caller speaking (``clientSpeaking`` "on"; a partial prompt);
- the agent speaking: Twilio's ``agentSpeaking`` "on", or, after text was sent, the time that
  text takes to say (:data:`SPOKEN_CHARS_PER_S`, on the slow side), until Twilio says its speech
  stopped with all text sent played (``agentSpeaking`` "off"). The estimate covers text Twilio
  never reports on: without it, a long answer would count as silence while it is said.

Caller speech, a prompt, a key press, an interruption, and agent text other than an idle turn's
(``i<n>``) start the silence over. A reconnected socket reads the call's past events first, so
the count of idle turns goes on, and so does the silence as far as the last ``caller.idle``
counted it (its ``silent_s``); what a previous socket counted after that, which no event
records, is lost: the count resumes from ``silent_s`` (from 0 if anyone has spoken since).
"""

from __future__ import annotations

import time

from parley.common.configuration.models import AgentSettings
from parley.common.events import CallEnded, Event
from parley.common.idle import Action, IdleSettings, IdleState

# How fast Twilio's voices say text, on the slow side (about 150 words a minute is 15 characters
# a second): an overestimate only starts the count a little late.
SPOKEN_CHARS_PER_S = 12.0
TICK_S = 0.25  # how often the clock is looked at


class RelayIdle:
    """One managed call's idle clock. ``now`` is :func:`time.monotonic` unless given."""

    def __init__(self, settings: AgentSettings) -> None:
        self.state = IdleState(IdleSettings(prompt_ms=round(settings.idle_prompt_s * 1000),
                                            hangup_ms=round(settings.idle_hangup_s * 1000)))
        self.client_speaking = False
        self.agent_speaking = False
        self.speaking_until = 0.0  # when the text sent so far is said, by the estimate
        self.typing = False  # keys typed that have not made their turn yet
        self.ended = False  # call.ended seen: nothing more is due

    @property
    def enabled(self) -> bool:
        """Whether the agent has either timer on."""
        return self.state.clock.settings.enabled

    def observe(self, event: Event) -> None:
        """One of the call's events (live, or from before this socket)."""
        self.state.observe(event)
        if isinstance(event, CallEnded):
            self.ended = True

    def caller_active(self) -> None:
        """The caller spoke, is speaking or pressed a key: the silence starts over."""
        self.state.clock.reset()

    def client_speaking_changed(self, on: bool) -> None:
        """Twilio's ``clientSpeaking``."""
        self.client_speaking = on
        if on:
            self.caller_active()

    def agent_text(self, turn_id: str, text: str, now: float | None = None) -> None:
        """Text of ``turn_id`` went to Twilio to be said."""
        now = time.monotonic() if now is None else now
        self.speaking_until = max(self.speaking_until, now) + len(text) / SPOKEN_CHARS_PER_S
        if turn_id not in self.state.idle_turns:  # the agent said something new
            self.state.clock.reset()

    def agent_speaking_changed(self, on: bool, *, all_played: bool,
                               now: float | None = None) -> None:
        """Twilio's ``agentSpeaking``; ``all_played``: every turn sent has played out."""
        self.agent_speaking = on
        if not on and all_played:
            self.speaking_until = time.monotonic() if now is None else now

    def interrupted(self, now: float | None = None) -> None:
        """The caller spoke over the agent: Twilio stopped saying anything."""
        self.agent_speaking = False
        self.speaking_until = time.monotonic() if now is None else now
        self.caller_active()

    def busy(self, now: float) -> bool:
        """Whether anything is going on at ``now`` (see the module docstring)."""
        return bool(self.state.unanswered or self.client_speaking or self.agent_speaking
                    or self.typing or now < self.speaking_until)

    def tick(self, now: float | None = None) -> Action | None:
        """Count the silence up to ``now``; what is due, if anything."""
        if self.ended:
            return None
        now = time.monotonic() if now is None else now
        return self.state.clock.tick(round(now * 1000), busy=self.busy(now))
