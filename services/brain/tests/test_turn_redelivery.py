"""A turn taken up again after the instance answering it died or failed part of the way through.

The events the first instance stored are published by hand, then a worker starts: the durable
hands it the unit of work as it would hand a redelivery to the next instance.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import LlmEvent, LlmRequest
from parley.brain.llm.router import LlmRouter
from parley.brain.worker import BrainWorker
from parley.common.bus import Bus
from parley.common.events import (
    AgentSay,
    ToolCompleted,
    ToolRequested,
    TurnStarted,
)
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse
from parley.devkit.infra import NatsServer

from .conftest import ORG, SETTINGS, open_call, services, user_says
from .test_hand_offs import tool_results


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


class HeldWhile:
    """A provider whose requests wait while the caller's words hold one of ``words``, until that
    word is released (a slow model keeping one of the instance's slots busy)."""

    def __init__(self, inner: AnthropicLlm, *words: str) -> None:
        self.inner = inner
        self.name, self.cost, self.supports_tools = inner.name, inner.cost, inner.supports_tools
        self.release = {word: asyncio.Event() for word in words}

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        for word, released in self.release.items():
            if word in request.last_user_text:
                await released.wait()
        async for event in self.inner.stream(request):
            yield event


async def test_parallel_tool_outcomes_on_two_instances_take_the_turn_up_once(
        bus, pool, emulator, recorder) -> None:
    """The model called two tools at once and both answered within moments. Instance X took
    the first outcome when both were stored: its fold showed no tool still out, so it took the
    turn up. Instance Y took the second and did the same: the round ran twice, two billed
    requests, two replies whose clauses share ids (the caller hears a mix of both) and whose
    tool calls all run. Now an outcome takes its turn up only if it is the turn's latest."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    held = HeldWhile(llm, "hold-alpha", "hold-beta", "Friday")
    busy = BrainWorker(dataclasses.replace(
        services(bus, pool, [held], turn_concurrency=2),
        router=LlmRouter([held], filler_after_ms=None, first_token_deadline_s=30.0)))
    other = BrainWorker(services(bus, pool, [llm]))
    await _greeted(bus, "c-two")
    await user_says(bus, "c-two", "t1", "Book me for Friday and text me the address.")
    await bus.publish(AgentSay(org_id=ORG, call_id="c-two", turn_id="t1", seq=0,
                               text="Let me do both."))
    tools = (("toolu_a", "book_appointment"), ("toolu_b", "send_sms"))
    for tool_call_id, name in tools:
        await bus.publish(ToolRequested(org_id=ORG, call_id="c-two", turn_id="t1",
                                        tool_call_id=tool_call_id, name=name))
    for call_id, word in (("c-alpha", "hold-alpha"), ("c-beta", "hold-beta")):
        await _greeted(bus, call_id)
        await user_says(bus, call_id, "t1", f"Please answer {word}.")
    await busy.start()
    try:
        # Both of X's slots hold a slow turn: the outcomes, both stored, wait for room.
        await recorder.wait("turn.started", "c-alpha")
        await recorder.wait("turn.started", "c-beta")
        for tool_call_id, name in tools:
            await bus.publish(ToolCompleted(org_id=ORG, call_id="c-two",
                                            tool_call_id=tool_call_id, name=name,
                                            result={"ok": True}))
        await asyncio.sleep(0.2)
        held.release["hold-alpha"].set()  # a slot frees: X takes the first outcome
        await recorder.wait("turn.started", "c-two")  # (X's model is slow for this round)
        await other.start()  # Y takes what X has no room for
        await asyncio.sleep(0.5)
        held.release["Friday"].set()
        await recorder.wait("turn.completed", "c-two")
        await asyncio.sleep(0.5)
        rounds = [r for r in emulator.requests if "hold-" not in str(r["messages"])]
        assert len(rounds) == 1, rounds
        completed = recorder.of("turn.completed", "c-two")
        assert len(completed) == 1 and not completed[0].cancelled
    finally:
        for released in held.release.values():
            released.set()
        await busy.stop()
        await other.stop()
        await llm.aclose()


class Counting:
    """A provider whose requests wait until released, counting how many are in flight at once."""

    def __init__(self, inner: AnthropicLlm) -> None:
        self.inner = inner
        self.name, self.cost, self.supports_tools = inner.name, inner.cost, inner.supports_tools
        self.release = asyncio.Event()
        self.asked = self.in_flight = self.most_in_flight = 0

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        self.asked += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            async for event in self.inner.stream(request):
                yield event
        finally:
            self.in_flight -= 1


async def test_a_turn_whose_unit_of_work_failed_does_not_run_beside_its_redelivery(
        tmp_path, pool, emulator) -> None:
    """NATS went away while a turn waited for its model, and the brain's keep-alive of the
    unit of work (in_progress) failed: its connection buffers nothing while it reconnects
    (pending_size 0 here; 2 MB by default, which a longer outage fills). The handler failed
    but left the turn's task running, unowned: the redelivery ran the same turn beside it,
    two billed requests in flight at once, both then saying the reply. Now the turn stops with
    its unit of work, and only the redelivery runs."""
    server = NatsServer(tmp_path / "nats").start()
    bus = await Bus.connect(server.url, name="pytest")
    await bus.ensure_streams()
    brain_bus = await Bus.connect(server.url, name="brain", pending_size=0)
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    counting = Counting(llm)
    worker = BrainWorker(dataclasses.replace(
        services(brain_bus, pool, [counting]),
        router=LlmRouter([counting], filler_after_ms=None, first_token_deadline_s=30.0)))
    await worker.start()
    try:
        await _greeted(bus, "c-blip")
        await user_says(bus, "c-blip", "t1", "When do you open?")
        deadline = asyncio.get_running_loop().time() + 5.0
        while counting.asked == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        server.stop()
        await asyncio.sleep(1.5)  # the keep-alive, due every second, fails
        server.start()
        deadline = asyncio.get_running_loop().time() + 15.0  # redelivered after ack_wait (5 s)
        while counting.asked < 2:
            assert asyncio.get_running_loop().time() < deadline, "not redelivered"
            await asyncio.sleep(0.05)
        counting.release.set()
        deadline = asyncio.get_running_loop().time() + 5.0
        while not (await bus.replay_call("c-blip"))[-1].type == "turn.completed":
            assert asyncio.get_running_loop().time() < deadline, "not completed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert counting.most_in_flight == 1
        assert len(emulator.requests) == 1
    finally:
        counting.release.set()
        await worker.stop()
        await llm.aclose()
        await brain_bus.close()
        await bus.close()
        server.stop()


class DiesBefore(Bus):
    """The worker's bus, except that sending ``tool_call_id``'s request fails once: the instance
    died there (or its connection did), the round's earlier events stored, none after."""

    def __init__(self, nc, tool_call_id: str) -> None:
        super().__init__(nc)
        self.tool_call_id, self.died = tool_call_id, False

    async def send(self, event, **kwargs):
        if isinstance(event, ToolRequested) and event.tool_call_id == self.tool_call_id and (
                not self.died):
            self.died = True
            raise ConnectionError("the instance died here")
        return await super().send(event, **kwargs)


async def test_a_round_whose_tool_requests_were_cut_short_requests_the_rest_once(
        bus, pool, emulator, recorder) -> None:
    """The model asked to book and to text the address; the brain died after publishing the
    booking's tool.requested. The redelivered turn found a tool requested and took the turn as
    continued through its tools: the text was never requested, and the booking's outcome took
    the turn up with one of the two results, the model asked again as if it had wanted one."""
    emulator.script(
        ScriptedReply(text="Let me do both.", tool_uses=(
            ScriptedToolUse(name="book_appointment", input={"day": "Friday"}, id="toolu_a"),
            ScriptedToolUse(name="send_sms", input={"text": "12 Main St"}, id="toolu_b"))),
        ScriptedReply(text="You're booked, and the address is on its way."))
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    dies = DiesBefore(bus.nc, "toolu_b")
    worker = BrainWorker(services(dies, pool, [llm]))
    await _greeted(bus, "c-cut")
    await worker.start()
    try:
        await user_says(bus, "c-cut", "t1", "Book me for Friday and text me the address.")
        await recorder.wait("tool.requested", "c-cut", count=2, timeout=5.0)
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-cut", tool_call_id="toolu_a",
                                        name="book_appointment", result={"booked": True}))
        await asyncio.sleep(0.5)
        assert len(emulator.requests) == 1  # the text's outcome is still to come
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-cut", tool_call_id="toolu_b",
                                        name="send_sms", result={"sent": True}))
        done, = await recorder.wait("turn.completed", "c-cut")
        assert not done.cancelled
        await asyncio.sleep(0.3)
        stored = [e for e in await bus.replay_call("c-cut") if isinstance(e, ToolRequested)]
        assert [(e.tool_call_id, e.name, e.arguments) for e in stored] == [
            ("toolu_a", "book_appointment", {"day": "Friday"}),
            ("toolu_b", "send_sms", {"text": "12 Main St"})]
        assert len(emulator.requests) == 2
        assert len(tool_results(emulator.requests[1])) == 2
    finally:
        await worker.stop()
        await llm.aclose()


def test_a_tool_requested_late_belongs_to_the_round_of_its_response() -> None:
    from parley.brain.conversation import fold
    from parley.common.events import RequestedCall, TurnUserEnded

    calls = [RequestedCall(tool_call_id="a", name="book_appointment"),
             RequestedCall(tool_call_id="b", name="send_sms")]

    def requested(tool_call_id: str, name: str) -> ToolRequested:
        return ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id=tool_call_id,
                             name=name, response_calls=calls)

    before = [TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="Both, please."),
              requested("a", "book_appointment"),
              ToolCompleted(org_id=ORG, call_id="c", tool_call_id="a", name="book_appointment")]
    turn = fold("c", before).turn("t1")
    assert turn.waiting_for_tools and set(turn.unrequested) == {"b"}
    turn = fold("c", [*before, requested("b", "send_sms")]).turn("t1")
    assert turn.waiting_for_tools and not turn.unrequested
    assert turn.requested_in == {"a": 0, "b": 0}
    turn = fold("c", [*before, requested("b", "send_sms"), ToolCompleted(
        org_id=ORG, call_id="c", tool_call_id="b", name="send_sms")]).turn("t1")
    assert not turn.waiting_for_tools and turn.latest_outcome == "b"


async def test_a_response_cut_short_before_its_hand_off_request_finishes_the_hand_off(
        bus, pool, emulator, recorder) -> None:
    """The model booked and hung up in one response; the brain died after publishing the
    booking's tool.requested, before end_call's. The redelivered turn requested end_call but,
    the hand-off not stored yet, did not take the round for a hand-off's: the speech was never
    closed (the tools service waited out its 20 s for the last words) and the turn never
    completed. Now the round is finished as a hand-off's: closed and completed, once."""
    from .test_hand_offs import with_hand_offs

    emulator.script(ScriptedReply(text="You're booked. Goodbye!", tool_uses=(
        ScriptedToolUse(name="book_appointment", input={"day": "Friday"}, id="toolu_a"),
        ScriptedToolUse(name="end_call", input={}, id="toolu_end"))))
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    dies = DiesBefore(bus.nc, "toolu_end")
    worker = BrainWorker(with_hand_offs(services(dies, pool, [llm])))
    await _greeted(bus, "c-bye")
    await worker.start()
    try:
        await user_says(bus, "c-bye", "t1", "Book me for Friday, that's all.")
        await recorder.wait("tool.requested", "c-bye", count=2, timeout=5.0)
        closing, = await recorder.wait("agent.say", "c-bye", timeout=5.0,
                                       where=lambda e: e.last and e.turn_id == "t1")
        assert closing.text == ""
        await recorder.wait("turn.completed", "c-bye", timeout=5.0)
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-bye", tool_call_id="toolu_a",
                                        name="book_appointment", result={"booked": True}))
        await asyncio.sleep(0.5)
        assert len(recorder.of("turn.completed", "c-bye")) == 1
        assert len(emulator.requests) == 1
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_hand_off_round_cut_short_closes_its_speech_after_an_outcome_began_another(
        bus, pool, emulator, recorder) -> None:
    """The same response, the brain dead after the booking's request, and the booking's
    outcome stored before the redelivery (the tool is quicker than the ack wait): that outcome
    began the turn's next utterance (t1.1), so the redelivery took t1 for closed and left it
    open; end_call waited out its 20 s for t1's last words. Now t1 is closed after its last
    clause, whatever began since."""
    from parley.common.events import RequestedCall

    from .test_hand_offs import with_hand_offs

    calls = [RequestedCall(tool_call_id="toolu_a", name="book_appointment"),
             RequestedCall(tool_call_id="toolu_end", name="end_call")]
    await _greeted(bus, "c-quick")
    await user_says(bus, "c-quick", "t1", "Book me for Friday, that's all.")
    for event in (AgentSay(org_id=ORG, call_id="c-quick", turn_id="t1", seq=0,
                           text="You're booked. Goodbye!"),
                  ToolRequested(org_id=ORG, call_id="c-quick", turn_id="t1",
                                tool_call_id="toolu_a", name="book_appointment",
                                response_calls=calls),
                  ToolCompleted(org_id=ORG, call_id="c-quick", tool_call_id="toolu_a",
                                name="book_appointment", result={"booked": True})):
        await bus.publish(event)
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        await recorder.wait("turn.completed", "c-quick", timeout=5.0)
        closing, = await recorder.wait("agent.say", "c-quick", timeout=5.0,
                                       where=lambda e: e.last and e.turn_id == "t1")
        assert (closing.seq, closing.text) == (1, "")
        await asyncio.sleep(0.5)
        assert [e.name for e in recorder.of("tool.requested", "c-quick")] == [
            "book_appointment", "end_call"]
        assert len(recorder.of("turn.completed", "c-quick")) == 1
        assert not emulator.requests
    finally:
        await worker.stop()
        await llm.aclose()
