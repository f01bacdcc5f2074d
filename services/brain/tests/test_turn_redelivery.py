"""A turn taken up again after the instance answering it died or failed part of the way through.

The events the first instance stored are published by hand, then a worker starts: the durable
hands it the unit of work as it would hand a redelivery to the next instance.
"""

from __future__ import annotations

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.worker import BrainWorker
from parley.common.events import (
    AgentSay,
    ToolCompleted,
    ToolRequested,
    TurnStarted,
)

from .conftest import ORG, SETTINGS, open_call, services, user_says


async def _greeted(bus, call_id: str) -> None:
    await open_call(bus, call_id)
    await bus.publish(AgentSay(org_id=ORG, call_id=call_id, turn_id="t0", seq=0,
                               text=SETTINGS.greeting, last=True))


async def test_a_turn_whose_closing_clause_went_out_but_not_its_completion_is_completed(
        bus, pool, emulator, recorder) -> None:
    """The instance said a turn's last clause, then died (or the publish of turn.completed
    timed out in a NATS blip, and the handler failed). The redelivered turn.user_ended found the
    speech closed and was skipped as already answered: the turn was never completed. After a tool
    round the redelivered outcome asked the model again, which went on after the closing clause
    (media voices nothing after a turn's last, yet the fold made it history). Now either is
    completed at once, with nothing more said and no model asked."""
    await _greeted(bus, "c-said")
    await user_says(bus, "c-said", "t1", "When do you open?")
    await bus.publish(TurnStarted(org_id=ORG, call_id="c-said", turn_id="t1"))
    await bus.publish(AgentSay(org_id=ORG, call_id="c-said", turn_id="t1", seq=0,
                               text="We open at eight.", last=True))

    await _greeted(bus, "c-tool")
    await user_says(bus, "c-tool", "t1", "Can I come Friday at ten?")
    await bus.publish(AgentSay(org_id=ORG, call_id="c-tool", turn_id="t1", seq=0,
                               text="Let me check the calendar."))
    await bus.publish(ToolRequested(org_id=ORG, call_id="c-tool", turn_id="t1",
                                    tool_call_id="toolu_1", name="book_appointment"))
    await bus.publish(ToolCompleted(org_id=ORG, call_id="c-tool", tool_call_id="toolu_1",
                                    name="book_appointment", result={"booked": True}))
    await bus.publish(AgentSay(org_id=ORG, call_id="c-tool", turn_id="t1", seq=1,
                               text="You're booked for Friday at ten.", last=True))

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
        for call_id in ("c-said", "c-tool"):
            done, = await recorder.wait("turn.completed", call_id, timeout=5.0)
            assert done.turn_id == "t1" and not done.cancelled
        assert emulator.requests == []
        said = {call_id: [(e.seq, e.text) for e in recorder.of("agent.say", call_id)
                          if e.turn_id == "t1"] for call_id in ("c-said", "c-tool")}
        assert said == {"c-said": [(0, "We open at eight.")],  # as stored, nothing added
                        "c-tool": [(0, "Let me check the calendar."),
                                   (1, "You're booked for Friday at ten.")]}
    finally:
        await worker.stop()
        await llm.aclose()
