"""The idle clock on its own: what counts as silence, and what is due when."""

from __future__ import annotations

from parley.common.events import (
    AgentSpeechFinished,
    CallDtmf,
    CallerIdle,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnUserEnded,
)
from parley.common.idle import IdleClock, IdleSettings, IdleState


def run(clock: IdleClock, until_ms: int, *, busy: bool = False, start_ms: int = 0
        ) -> list[tuple[int, str]]:
    """Tick every 100 ms from ``start_ms`` to ``until_ms``; what came due, and when."""
    due = []
    for now in range(start_ms, until_ms + 1, 100):
        action = clock.tick(now, busy=busy)
        if action is not None:
            due.append((now, action))
    return due


def test_prompt_then_hang_up_counting_only_silence() -> None:
    clock = IdleClock(IdleSettings(prompt_ms=8000, hangup_ms=30000))
    assert run(clock, 9000) == [(8000, "prompt")]
    # The prompt plays for 2 s: the count pauses, it does not start over.
    assert run(clock, 11000, busy=True, start_ms=9100) == []
    assert run(clock, 40000, start_ms=11100) == [(32000, "hangup")]
    assert run(clock, 46000, start_ms=40100) == []  # once (a hang-up ends the call)


def test_a_reset_starts_the_silence_and_the_prompt_over() -> None:
    clock = IdleClock(IdleSettings(prompt_ms=1000, hangup_ms=3000))
    assert run(clock, 1500) == [(1000, "prompt")]
    clock.reset()
    assert run(clock, 5000, start_ms=1600) == [(2500, "prompt"), (4500, "hangup")]


def test_zero_is_off_and_a_hang_up_due_first_comes_without_the_prompt() -> None:
    assert run(IdleClock(IdleSettings(prompt_ms=0, hangup_ms=0)), 60000) == []
    assert not IdleSettings(prompt_ms=0, hangup_ms=0).enabled
    assert run(IdleClock(IdleSettings(prompt_ms=0, hangup_ms=2000)), 9000) == [(2000, "hangup")]
    assert run(IdleClock(IdleSettings(prompt_ms=2000, hangup_ms=0)), 9000) == [(2000, "prompt")]
    assert run(IdleClock(IdleSettings(prompt_ms=2000, hangup_ms=2000)), 9000) == [
        (2000, "hangup")]


def test_a_hang_up_that_left_the_line_silent_is_asked_for_again() -> None:
    # The gateway timed out on the hang-up (not the caller answering: that resets the clock).
    # The line stays silent: the hang-up is asked for again after each further retry interval,
    # the goodbye's own audio not counted, and never the prompt again.
    clock = IdleClock(IdleSettings(prompt_ms=8000, hangup_ms=30000, hangup_retry_ms=15000))
    assert run(clock, 30000) == [(8000, "prompt"), (30000, "hangup")]
    assert run(clock, 34000, busy=True, start_ms=30100) == []  # the goodbye plays
    assert run(clock, 65000, start_ms=34100) == [(49000, "hangup"), (64000, "hangup")]
    clock.reset()  # the caller spoke after all: a silence of its own, prompt first
    assert run(clock, 100000, start_ms=65100) == [(73000, "prompt"), (95000, "hangup")]


# -- IdleState: the pending answer and the idle turns, from the call's events ------------------

ORG, CALL = "org_1", "call_1"


def _ev(cls: type, **fields: object) -> object:
    return cls(org_id=ORG, call_id=CALL, **fields)


def test_a_caller_turn_is_pending_until_the_brain_completes_it() -> None:
    state = IdleState(IdleSettings())
    state.observe(_ev(TurnUserEnded, turn_id="t1", text="hi", reason="silence"))
    assert state.unanswered == "t1"
    state.observe(_ev(TurnCompleted, turn_id="t2"))  # another turn's completion: no
    assert state.unanswered == "t1"
    state.observe(_ev(TurnCompleted, turn_id="t1"))
    assert state.unanswered == ""


def test_a_failed_hand_off_reopens_the_turn_until_its_follow_up_completes() -> None:
    state = IdleState(IdleSettings())
    state.observe(_ev(TurnUserEnded, turn_id="turn_a", text="bye", reason="prompt"))
    state.observe(_ev(ToolRequested, turn_id="turn_a", tool_call_id="c1", name="end_call",
                      arguments={}))
    state.observe(_ev(TurnCompleted, turn_id="turn_a"))
    assert state.unanswered == ""
    state.observe(_ev(ToolFailed, tool_call_id="c1", name="end_call", error="refused"))
    assert state.unanswered == "turn_a"  # the brain says why, in turn_a.1
    state.observe(_ev(AgentSpeechFinished, turn_id="turn_a"))  # "Goodbye!" played: not it
    assert state.unanswered == "turn_a"
    state.observe(_ev(AgentSpeechFinished, turn_id="turn_a.1"))
    assert state.unanswered == ""
    # A hand-off failing for a turn the caller has since followed reopens nothing.
    state.observe(_ev(TurnUserEnded, turn_id="turn_b", text="and?", reason="prompt"))
    state.observe(_ev(TurnCompleted, turn_id="turn_b"))
    state.observe(_ev(ToolRequested, turn_id="turn_a.1", tool_call_id="c2", name="end_call",
                      arguments={}))
    state.observe(_ev(ToolFailed, tool_call_id="c2", name="end_call", error="refused"))
    assert state.unanswered == ""


def test_a_predecessors_idle_turns_are_counted_and_its_silence_goes_on() -> None:
    state = IdleState(IdleSettings(prompt_ms=1000, hangup_ms=3000))
    state.observe(_ev(CallerIdle, turn_id="i0", action="prompt", silent_s=1.0))
    state.observe(_ev(CallerIdle, turn_id="i1", action="hangup", silent_s=3.0))
    assert state.next_idle_turn() == (2, "i2")
    assert state.clock.prompted and state.clock.silent_ms == 3000
    assert state.clock.hangup_due_ms == 3000 + state.clock.settings.hangup_retry_ms
    state.observe(_ev(CallDtmf, digit="1"))
    assert state.clock.silent_ms == 0 and not state.clock.prompted


def test_the_last_words_of_a_second_refused_hand_off_are_not_its_follow_up() -> None:
    """A transfer refused at once fails while its own last words still play. The first
    hand-off's words ("Let me transfer you", ``turn_a``) finishing did not end the wait for what
    the brain says next, but a second one's, asked for in the follow-up ``turn_a.1`` (the model
    tries another number), did: the time the brain took to write ``turn_a.2`` counted as the
    caller's silence, and a slow model's answer came after "Are you still there?"."""
    state = IdleState(IdleSettings())
    state.observe(_ev(TurnUserEnded, turn_id="turn_a", text="Put me through to Bob.",
                      reason="prompt"))
    state.observe(_ev(ToolRequested, turn_id="turn_a", tool_call_id="c1",
                      name="transfer_call", arguments={"to": "+15550001"}))
    state.observe(_ev(ToolFailed, tool_call_id="c1", name="transfer_call", error="not allowed"))
    state.observe(_ev(TurnCompleted, turn_id="turn_a"))
    state.observe(_ev(AgentSpeechFinished, turn_id="turn_a"))  # "Let me transfer you" played
    assert state.unanswered == "turn_a"  # the first level holds: turn_a.1 is owed

    # turn_a.1: "Sorry, I can't reach Bob. Let me try the front desk." + a second transfer,
    # refused at once too.
    state.observe(_ev(ToolRequested, turn_id="turn_a.1", tool_call_id="c2",
                      name="transfer_call", arguments={"to": "+15550002"}))
    state.observe(_ev(ToolFailed, tool_call_id="c2", name="transfer_call", error="not allowed"))
    state.observe(_ev(TurnCompleted, turn_id="turn_a"))  # round 2 completes
    assert state.unanswered == "turn_a"  # turn_a.2 ("I can't transfer you now…") is owed
    state.observe(_ev(AgentSpeechFinished, turn_id="turn_a.1"))  # the second hand-off's words
    assert state.unanswered == "turn_a", "turn_a.2 is still being written"


def test_a_turn_detected_again_after_a_take_over_is_not_pending_again() -> None:
    """A successor that took the call over within a second of a turn's end resumes before it
    (the lease lags the events) and detects the turn again, under the same id. Its catch-up
    had read the turn's completion; the repeat made the turn pending again, and as JetStream
    drops the repeated turn.user_ended no completion ever came: no idle handling until the
    caller spoke."""
    state = IdleState(IdleSettings())
    state.observe(_ev(TurnUserEnded, turn_id="t4", text="Thanks.", reason="silence"))
    state.observe(_ev(TurnCompleted, turn_id="t4"))
    assert state.unanswered == ""
    state.awaiting("t4")  # detected again, live
    assert state.unanswered == ""
    state.awaiting("t5")
    assert state.unanswered == "t5"
