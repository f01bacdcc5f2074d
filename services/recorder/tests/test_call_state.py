from parley.common import events as ev
from parley.recorder.domain.call_state import evolve


def fold(events):
    state = None
    for position, event in enumerate(events, 1):
        state = evolve(state, position, event)
    return state


def test_an_inbound_call_from_request_to_end() -> None:
    state = fold([
        ev.CallRequested(org_id="o1", call_id="c1", direction="inbound", agent_id="a1",
                         from_number="+15550001", to_number="+15550002"),
        ev.CallAnswered(org_id="o1", call_id="c1"),
        ev.CallStreamStarted(org_id="o1", call_id="c1", stream_id="s", gateway_instance="g1"),
        ev.TurnUserEnded(org_id="o1", call_id="c1", turn_id="t1", text="hi"),
        ev.TurnUserEnded(org_id="o1", call_id="c1", turn_id="t2", text="bye"),
        ev.TurnUserEnded(org_id="o1", call_id="c1", turn_id="t3", text="bye now", revises="t2"),
        ev.CallEnded(org_id="o1", call_id="c1", reason="caller_hangup", duration_s=42.0),
    ])
    assert state is not None
    assert (state.state, state.turns, state.end_reason, state.duration_s) == \
        ("ended", 2, "caller_hangup", 42.0)
    assert state.agent_id == "a1" and state.event_count == 7 and state.last_position == 7
    assert state.answered_at is not None and state.ended_at is not None


def test_a_late_event_never_moves_a_call_backwards() -> None:
    state = fold([
        ev.CallEnded(org_id="o1", call_id="c1", reason="no_answer"),
        ev.CallRinging(org_id="o1", call_id="c1"),
    ])
    assert state is not None and state.state == "ended"


def test_failed_call_keeps_the_reason() -> None:
    state = fold([ev.CallDialing(org_id="o1", call_id="c1", carrier_call_id="CA1"),
                  ev.CallFailed(org_id="o1", call_id="c1", reason="busy")])
    assert state is not None and state.state == "failed" and state.failure_reason == "busy"
    assert state.carrier_call_id == "CA1"


def test_non_call_events_are_ignored() -> None:
    assert fold([ev.AgentCreated(org_id="o1", agent_id="a1", name="x")]) is None
