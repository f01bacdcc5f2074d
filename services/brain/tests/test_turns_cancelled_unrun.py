"""A turn cancelled while no instance was running it is completed all the same.

``turn.completed`` (cancelled) used to be published only by an instance running the turn when
the caller barged in, spoke again or hung up. A turn whose instance had died (its unit of work
redelivered after the cancellation) or that waited for a tool's outcome had none running it:
its unit of work came back, saw the turn superseded, and returned. An integrator saw
``turn.started`` and never its ``turn.completed``.

The events the first instance stored are published by hand, then a worker starts: the durable
hands it the unit of work as it would hand a redelivery to the next instance.
"""

from __future__ import annotations

import asyncio

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.worker import BrainWorker
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    CallEnded,
    RequestedCall,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnStarted,
    UsageRecorded,
)

from .conftest import ORG, SETTINGS, open_call, services, user_says


async def _started_t1(bus, call_id: str, *, tool: bool = False) -> None:
    """t1 began (turn.started, a clause, 120 input tokens recorded), perhaps calling a tool."""
    await open_call(bus, call_id)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t0", seq=0,
                               text=SETTINGS.greeting, last=True))
    await user_says(bus, call_id, "t1", "Can I come Friday at ten?")
    await bus.publish(TurnStarted(org_id=ORG, call_id=call_id, turn_id="t1"))
    await bus.publish(UsageRecorded(org_id=ORG, call_id=call_id, turn_id="t1",
                                    kind="llm_input_tokens", quantity=120, unit="tokens",
                                    provider="anthropic"))
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                               text="Let me check the calendar."))
    if tool:
        await bus.publish(ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1",
                                        tool_call_id="toolu_1", name="book_appointment"))


async def _cancelled_once(recorder, call_id: str) -> None:
    done, = await recorder.wait("turn.completed", call_id, timeout=5.0,
                                where=lambda e: e.turn_id == "t1")
    assert done.cancelled and done.usage.input_tokens == 120
    # Under the id its completion would have had: a late original's is a duplicate.
    assert done.id == BrainWorker._completion_id(call_id, "t1", 0)
    await asyncio.sleep(0.3)
    assert len([e for e in recorder.of("turn.completed", call_id) if e.turn_id == "t1"]) == 1


async def test_a_turn_whose_instance_died_is_completed_by_its_redelivery_once_cancelled(
        bus, pool, emulator, recorder) -> None:
    """The instance answering t1 died mid-reply. Before its unit of work came back the caller
    barged in (c-barge) or spoke again (c-next): the redelivery found t1 cancelled and
    returned, leaving t1 started and never completed."""
    await _started_t1(bus, "c-barge")
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-barge", turn_id="t1",
                                             played_text="Let me"))
    await _started_t1(bus, "c-next")
    await user_says(bus, "c-next", "t2", "Actually, make it Monday.")

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await _cancelled_once(recorder, "c-barge")
        await _cancelled_once(recorder, "c-next")
        t2, = await recorder.wait("turn.completed", "c-next", where=lambda e: e.turn_id == "t2")
        assert not t2.cancelled  # the newer turn is answered as ever
        assert len(emulator.requests) == 1  # t1 is not asked again
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_turn_waiting_for_a_tool_is_completed_by_its_outcome_once_cancelled(
        bus, pool, emulator, recorder) -> None:
    """t1 waited for a slow tool (no instance running it) when the caller barged in (c-barge),
    spoke again (c-next) or hung up (c-gone). The outcome came later: its unit of work found
    the turn cancelled and returned without completing it."""
    await _started_t1(bus, "c-barge", tool=True)
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-barge", turn_id="t1",
                                             played_text="Let me check"))
    await _started_t1(bus, "c-next", tool=True)
    await user_says(bus, "c-next", "t2", "Hello? Are you there?")
    await _started_t1(bus, "c-gone", tool=True)
    await bus.publish(CallEnded(org_id=ORG, call_id="c-gone", reason="caller_hangup"))

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await recorder.wait("turn.completed", "c-next", where=lambda e: e.turn_id == "t2")
        await asyncio.sleep(0.5)  # t1's own unit of work is done: its tool is still out
        for call_id in ("c-barge", "c-next", "c-gone"):
            assert not [e for e in recorder.of("turn.completed", call_id) if e.turn_id == "t1"]
            await bus.publish(ToolCompleted(org_id=ORG, call_id=call_id, tool_call_id="toolu_1",
                                            name="book_appointment", result={"booked": True}))
        for call_id in ("c-barge", "c-next", "c-gone"):
            await _cancelled_once(recorder, call_id)
        assert len(emulator.requests) == 1  # t2's: the cancelled turns are not taken up
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_hand_off_refused_after_a_barge_in_adds_no_completion(
        bus, pool, emulator, recorder) -> None:
    """The caller cut off "Goodbye!" and the tools service refused the hang-up: the failure
    reopens the turn, but its outcome takes it up no more (the caller interrupted it). Its
    completion closed what the integrator saw start; no round began since, so none is due."""
    await open_call(bus, "c-bye")
    await user_says(bus, "c-bye", "t1", "That's all, thanks.")
    await bus.publish(TurnStarted(org_id=ORG, call_id="c-bye", turn_id="t1"))
    await bus.publish(AgentSay(org_id=ORG, call_id="c-bye", turn_id="t1", seq=0,
                               text="Goodbye!", last=True))
    await bus.publish(ToolRequested(org_id=ORG, call_id="c-bye", turn_id="t1",
                                    tool_call_id="toolu_e", name="end_call"))
    await bus.publish(TurnCompleted(id=BrainWorker._completion_id("c-bye", "t1", 0),
                                    org_id=ORG, call_id="c-bye", turn_id="t1"))
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="c-bye", turn_id="t1",
                                             played_text="Good"))
    await bus.publish(ToolFailed(org_id=ORG, call_id="c-bye", tool_call_id="toolu_e",
                                 name="end_call", error="the caller interrupted"))

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        await asyncio.sleep(1.5)
        assert len(recorder.of("turn.completed", "c-bye")) == 1  # the one stored
        assert emulator.requests == []
    finally:
        await worker.stop()
        await llm.aclose()


async def _goodbye_requested(bus, call_id: str, *, booked: bool = False,
                             spoke_again: bool = False) -> None:
    """t1 said "Goodbye!" and called end_call (or booked and called it, booked: the brain died
    after the booking's request, before end_call's); its instance died before closing the
    speech and completing the turn, and the caller barged in on the goodbye (or, spoke_again:
    spoke again once it had played, a new turn, t2)."""
    await _started_t1(bus, call_id)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=1,
                               text="Goodbye!"))
    calls = [RequestedCall(tool_call_id="toolu_1", name="book_appointment"),
             RequestedCall(tool_call_id="toolu_e", name="end_call")]
    request = calls[0] if booked else calls[1]
    await bus.publish(ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1",
                                    tool_call_id=request.tool_call_id, name=request.name,
                                    response_calls=calls if booked else []))
    if spoke_again:
        await user_says(bus, call_id, "t2", "Actually, one more thing.")
        return
    await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id=call_id, turn_id="t1",
                                             played_text="Let me check the calendar. Good"))


async def test_a_hand_off_round_whose_instance_died_is_completed_once_the_caller_cut_it_off(
        bus, pool, emulator, recorder) -> None:
    """The brain said "Goodbye!" and called end_call, then died before the turn's completion;
    the caller barged in on the goodbye before the unit of work came back. The redelivery saw
    the turn interrupted and returned before it finished the hand-off's round: its completion
    was never published, and the refusal that followed (the caller cut off the last words)
    reopened the turn, which stayed open for good. Now the redelivery completes the round,
    cancelled, under the hand-off's completion id, and says and requests nothing: not the
    closing clause (the caller cut the speech off), nor a hang-up never requested (c-booked:
    the caller interrupted the goodbye, so it does not happen)."""
    await _goodbye_requested(bus, "c-late")  # refused after the redelivery
    await _goodbye_requested(bus, "c-first")  # refused before it
    await bus.publish(ToolFailed(org_id=ORG, call_id="c-first", tool_call_id="toolu_e",
                                 name="end_call", error="not hung up: the caller interrupted"))
    await _goodbye_requested(bus, "c-booked", booked=True)

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        for call_id in ("c-late", "c-first", "c-booked"):
            await _cancelled_once(recorder, call_id)
        await bus.publish(ToolFailed(org_id=ORG, call_id="c-late", tool_call_id="toolu_e",
                                     name="end_call", error="not hung up: the caller interrupted"))
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-booked", tool_call_id="toolu_1",
                                        name="book_appointment", result={"booked": True}))
        await asyncio.sleep(0.5)
        for call_id in ("c-late", "c-first", "c-booked"):
            assert len(recorder.of("turn.completed", call_id)) == 1, call_id
            assert not [e for e in recorder.of("agent.say", call_id) if e.last and
                        e.turn_id == "t1"], call_id  # what the caller cut off is not closed
            assert len(recorder.of("tool.requested", call_id)) == 1, call_id
        assert emulator.requests == []  # the interrupted turns are not taken up
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_hand_off_round_whose_instance_died_is_completed_once_the_caller_spoke_again(
        bus, pool, emulator, recorder) -> None:
    """As above, but the caller did not barge in: the goodbye played (never closed: no
    agent.speech.finished) and they spoke again. The redelivery completes t1's round once,
    cancelled, closes nothing and requests no hang-up never requested (c-booked); the tools
    service refuses the one requested (the caller spoke again before the goodbye was over),
    before the redelivery (c-first) or after it (c-late), and that adds nothing. t2 is
    answered as any turn."""
    refusal = "not hung up: the caller spoke again before the goodbye was over"
    await _goodbye_requested(bus, "c-late", spoke_again=True)
    await _goodbye_requested(bus, "c-first", spoke_again=True)
    await bus.publish(ToolFailed(org_id=ORG, call_id="c-first", tool_call_id="toolu_e",
                                 name="end_call", error=refusal))
    await _goodbye_requested(bus, "c-booked", booked=True, spoke_again=True)

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        for call_id in ("c-late", "c-first", "c-booked"):
            await _cancelled_once(recorder, call_id)
            t2, = await recorder.wait("turn.completed", call_id,
                                      where=lambda e: e.turn_id == "t2")
            assert not t2.cancelled, call_id
        await bus.publish(ToolFailed(org_id=ORG, call_id="c-late", tool_call_id="toolu_e",
                                     name="end_call", error=refusal))
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-booked", tool_call_id="toolu_1",
                                        name="book_appointment", result={"booked": True}))
        await asyncio.sleep(0.5)
        for call_id in ("c-late", "c-first", "c-booked"):
            assert len(recorder.of("turn.completed", call_id)) == 2, call_id  # t1's, t2's
            assert not [e for e in recorder.of("agent.say", call_id) if e.last and
                        e.turn_id == "t1"], call_id
            assert len(recorder.of("tool.requested", call_id)) == 1, call_id
        assert len(emulator.requests) == 3  # each call's t2; t1 is not taken up again
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_hand_off_round_whose_instance_died_is_completed_after_the_hang_up(
        bus, pool, emulator, recorder) -> None:
    """The brain said "Goodbye!" and called end_call, then died before closing the speech and
    completing the turn; the tools service hung up all the same (its wait for the last words
    timed out). The redelivery found the call ended and returned: the turn was never
    completed. Now it is, not cancelled (the hand-off went through), and nothing is said."""
    await _started_t1(bus, "c-hung")
    await bus.publish(ToolRequested(org_id=ORG, call_id="c-hung", turn_id="t1",
                                    tool_call_id="toolu_e", name="end_call"))
    await bus.publish(ToolCompleted(org_id=ORG, call_id="c-hung", tool_call_id="toolu_e",
                                    name="end_call", result={"ok": True}))
    await bus.publish(CallEnded(org_id=ORG, call_id="c-hung", reason="agent_hangup"))

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        done, = await recorder.wait("turn.completed", "c-hung", timeout=5.0)
        assert not done.cancelled and done.usage.input_tokens == 120
        assert done.id == BrainWorker._completion_id("c-hung", "t1", 0)
        await asyncio.sleep(0.3)
        assert len(recorder.of("turn.completed", "c-hung")) == 1
        assert len(recorder.of("agent.say", "c-hung")) == 2 and emulator.requests == []
    finally:
        await worker.stop()
        await llm.aclose()
