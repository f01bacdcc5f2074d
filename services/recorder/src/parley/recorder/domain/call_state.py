"""The state of a call as the ``calls`` read model sees it: a pure fold over its events."""

from __future__ import annotations

from datetime import datetime

import msgspec

from parley.common import events as ev

# Ordered lifecycle; a late or redelivered event never moves a call backwards.
_RANK = {"requested": 0, "dialing": 1, "ringing": 2, "answered": 3, "streaming": 4,
         "transferred": 5, "ended": 6, "failed": 6}


class CallState(msgspec.Struct, kw_only=True):
    """One row of ``calls``."""

    call_id: str
    org_id: str
    agent_id: str = ""
    direction: str = ""
    from_number: str = ""
    to_number: str = ""
    carrier: str = ""
    carrier_call_id: str = ""
    state: str = "requested"
    answered_by: str = ""
    end_reason: str = ""
    failure_reason: str = ""
    requested_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    turns: int = 0
    event_count: int = 0
    last_position: int = 0


def _advance(state: CallState, to: str) -> None:
    if _RANK[to] >= _RANK[state.state]:
        state.state = to


def evolve(state: CallState | None, position: int, event: ev.Event) -> CallState | None:
    """Apply one event to a call's state (mutating and returning it); None if not a call."""
    if not isinstance(event, ev.CallEvent):
        return state
    if state is None:
        state = CallState(call_id=event.call_id, org_id=event.org_id, requested_at=event.at)
    state.event_count += 1
    state.last_position = position
    match event:
        case ev.CallRequested():
            state.agent_id, state.direction = event.agent_id, event.direction
            state.from_number, state.to_number = event.from_number, event.to_number
            state.carrier, state.requested_at = event.carrier, event.at
            state.carrier_call_id = event.carrier_call_id or state.carrier_call_id
        case ev.CallDialing():
            state.carrier_call_id = event.carrier_call_id
            _advance(state, "dialing")
        case ev.CallRinging():
            _advance(state, "ringing")
        case ev.CallAnswered():
            state.answered_at = state.answered_at or event.at
            _advance(state, "answered")
        case ev.CallMachineDetected():
            state.answered_by = event.answered_by
        case ev.CallStreamStarted():
            state.agent_id = state.agent_id or event.agent_id
            state.answered_at = state.answered_at or event.at
            _advance(state, "streaming")
        case ev.TurnUserEnded():
            state.turns += 0 if event.revises else 1  # a revision replaces its turn
        case ev.CallTransferred():
            _advance(state, "transferred")
        case ev.CallEnded():
            state.end_reason, state.ended_at = event.reason, event.at
            state.duration_s = event.duration_s
            _advance(state, "ended")
        case ev.CallFailed():
            state.failure_reason, state.ended_at = event.reason, event.at
            _advance(state, "failed")
    return state
