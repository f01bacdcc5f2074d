"""Hand-offs (end_call, transfer_call): the turn ends with them, unless they fail.

A refused transfer used to leave the caller on a silent line after "Let me transfer you": the
turn had completed, so the failure waited for the caller's next words. Now the failure takes the
turn up again and the model tells the caller, as a new utterance (media voices no clause after a
turn's last one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

from parley.brain.conversation import fold
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import ToolSpec
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.worker import MAX_TOOL_CALLS_PER_TURN, BrainServices, BrainWorker
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    Event,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TurnCompleted,
    TurnUserEnded,
)
from parley.common.tools.builtin_specs import offered_builtins
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse

from .conftest import ORG, open_call, services, user_says

DESK = "+14155550999"
REFUSED = (f"transfer target {DESK} not allowed for this agent; transfer only to "
           "+14155550123, or offer a callback (schedule_callback).")


def with_hand_offs(base: BrainServices) -> BrainServices:
    """The brain offers end_call and transfer_call (pinned to DESK) as it would to an agent."""
    specs = [ToolSpec(name=s.name, description=s.description, input_schema=s.parameters)
             for s in offered_builtins([DESK]).values() if s.name in ("end_call", "transfer_call")]

    async def tools(org_id: str, agent_id: str) -> list[ToolSpec]:
        return specs

    return dataclasses.replace(base, tools=tools)


def transfer(tool_id: str = "toolu_t") -> ScriptedReply:
    return ScriptedReply(text="Let me transfer you to our front desk.", tool_uses=(
        ScriptedToolUse(name="transfer_call", input={"to": DESK}, id=tool_id),))


def tool_results(request: dict) -> list[dict]:
    return [block for message in request["messages"] if isinstance(message["content"], list)
            for block in message["content"] if block.get("type") == "tool_result"]


async def test_a_refused_transfer_is_told_to_the_caller_at_once(bus, pool, emulator,
                                                                 recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        emulator.script(transfer(), ScriptedReply(
            text="I can't transfer you right now. Can I take a message?"))
        await open_call(bus, "h1")
        await user_says(bus, "h1", "t1", "Can I talk to a person?")
        requested, = await recorder.wait("tool.requested", "h1")
        first, = await recorder.wait("turn.completed", "h1")  # the turn ends with the hand-off
        assert requested.turn_id == "t1" and not first.cancelled
        said = [e for e in recorder.of("agent.say", "h1") if e.turn_id == "t1"]
        assert said[-1].last  # the speech is closed: media plays it out, then the transfer

        await bus.publish(ToolFailed(org_id=ORG, call_id="h1", tool_call_id="toolu_t",
                                     name="transfer_call", error=REFUSED))
        # The caller hears why, without having to speak first: a new utterance of turn t1.
        said = await recorder.wait("agent.say", "h1", where=lambda e: e.turn_id == "t1.1" and
                                   e.last)
        again = [e for e in recorder.of("agent.say", "h1") if e.turn_id == "t1.1"]
        assert [(e.seq, e.text) for e in again] == [
            (0, "I can't transfer you right now."), (1, "Can I take a message?")], said
        completed = await recorder.wait("turn.completed", "h1", count=2)
        assert len({c.id for c in completed}) == 2 and not completed[1].cancelled
        # Each completion reports its own rounds: together, what the turn recorded, once.
        recorded = {kind: sum(u.quantity for u in recorder.of("usage.recorded", "h1")
                              if u.kind == kind)
                    for kind in ("llm_input_tokens", "llm_output_tokens")}
        assert recorded["llm_input_tokens"] and recorded["llm_output_tokens"]
        assert [sum(c.usage.input_tokens for c in completed),
                sum(c.usage.output_tokens for c in completed)] == [
            recorded["llm_input_tokens"], recorded["llm_output_tokens"]]
        result, = tool_results(emulator.requests[-1])
        assert result["is_error"] and "not allowed" in str(result["content"])
        conversation = fold("h1", await bus.replay_call("h1"))
        turn = conversation.turn("t1")
        assert turn.completed and turn.speeches == ["t1", "t1.1"]
        assert conversation.llm_messages()[-1].text == (
            "I can't transfer you right now. Can I take a message?")

        # The same outcome again (a redelivery, a duplicate) changes nothing.
        await bus.publish(ToolFailed(org_id=ORG, call_id="h1", tool_call_id="toolu_t",
                                     name="transfer_call", error=REFUSED))
        await asyncio.sleep(0.5)
        assert len(emulator.requests) == 2 and len(recorder.of("turn.completed", "h1")) == 2
        assert len(recorder.of("agent.say", "h1")) == 1 + 2 + 2  # greeting, t1, t1.1
    finally:
        await worker.stop()
        await llm.aclose()


async def test_what_is_said_after_a_refused_transfer_is_said_once(bus, pool, emulator,
                                                                   recorder) -> None:
    # The reply after the refusal breaks off mid-way (its instance dies, or the provider fails)
    # and is run again: it goes on from what the caller heard, in the same utterance.
    reply = "I can't transfer you right now. The front desk is closed. Can I take a message?"

    def recovered(body: dict) -> ScriptedReply:
        emulator.faults.error_after_tokens = None
        return ScriptedReply(text=reply)

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        emulator.script(transfer(), ScriptedReply(text=reply), recovered)
        await open_call(bus, "h5")
        await user_says(bus, "h5", "t1", "Put me through to the front desk.")
        await recorder.wait("turn.completed", "h5")
        emulator.faults.error_after_tokens = 9
        await bus.publish(ToolFailed(org_id=ORG, call_id="h5", tool_call_id="toolu_t",
                                     name="transfer_call", error=REFUSED))
        await recorder.wait("turn.completed", "h5", count=2)
        said = [(e.seq, e.text, e.last) for e in recorder.of("agent.say", "h5")
                if e.turn_id == "t1.1"]
        assert [seq for seq, _, _ in said] == list(range(len(said))), said
        assert " ".join(text for _, text, _ in said if text) == reply
        assert [last for _, _, last in said].count(True) == 1 and said[-1][2]
        assert len(emulator.requests) == 3
        assert emulator.requests[2]["messages"][-1]["role"] == "assistant"  # the prefill
    finally:
        await worker.stop()
        await llm.aclose()


async def test_the_caller_can_interrupt_what_is_said_after_a_refused_transfer(
        bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        emulator.script(transfer(), ScriptedReply(
            text="I can't transfer you right now, but let me tell you about our hours, " * 8))
        await open_call(bus, "h6")
        await user_says(bus, "h6", "t1", "Transfer me, please.")
        await recorder.wait("turn.completed", "h6")
        emulator.tokens_per_second = 20
        await bus.publish(ToolFailed(org_id=ORG, call_id="h6", tool_call_id="toolu_t",
                                     name="transfer_call", error=REFUSED))
        await recorder.wait("agent.say", "h6", where=lambda e: e.turn_id == "t1.1")
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="h6", turn_id="t1.1",
                                                 played_text="I can't transfer you"))
        completed = await recorder.wait("turn.completed", "h6", count=2)
        assert completed[1].cancelled
        assert not any(e.last for e in recorder.of("agent.say", "h6") if e.turn_id == "t1.1")
        conversation = fold("h6", await bus.replay_call("h6"))
        assert conversation.llm_messages()[-1].text == "I can't transfer you"
    finally:
        await worker.stop()
        await llm.aclose()


async def test_a_hand_off_that_goes_through_ends_the_turn_with_nothing_more_said(
        bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        emulator.script(ScriptedReply(text="Thanks for calling. Goodbye!", tool_uses=(
            ScriptedToolUse(name="end_call", input={}, id="toolu_e"),)))
        await open_call(bus, "h2")
        await user_says(bus, "h2", "t1", "That's all, bye.")
        await recorder.wait("tool.requested", "h2")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="h2", tool_call_id="toolu_e",
                                        name="end_call", result={"ok": True}))
        await recorder.wait("tool.completed", "h2")
        await asyncio.sleep(0.5)
        assert len(emulator.requests) == 1
        assert len(recorder.of("turn.completed", "h2")) == 1
        says = [e for e in recorder.of("agent.say", "h2") if e.turn_id != "t0"]
        assert {e.turn_id for e in says} == {"t1"} and says[-1].last
    finally:
        await worker.stop()
        await llm.aclose()


async def test_local_responder_offers_a_follow_up_after_a_refused_transfer(
        bus, pool, recorder) -> None:
    worker = BrainWorker(with_hand_offs(services(bus, pool, [LocalResponder()])))
    await worker.start()
    try:
        await open_call(bus, "h3")
        await user_says(bus, "h3", "t1", "A human, please.")
        requested, = await recorder.wait("tool.requested", "h3")
        assert requested.name == "transfer_call" and requested.arguments == {"to": DESK}
        await bus.publish(ToolFailed(org_id=ORG, call_id="h3", tool_call_id=requested.tool_call_id,
                                     name="transfer_call", error=REFUSED))
        await recorder.wait("turn.completed", "h3", count=2)
        answer = " ".join(e.text for e in recorder.of("agent.say", "h3") if e.turn_id == "t1.1")
        assert "can't transfer" in answer and "follow up" in answer, answer
        await asyncio.sleep(0.3)
        assert len(recorder.of("tool.requested", "h3")) == 1  # not tried again
    finally:
        await worker.stop()


async def test_a_model_that_keeps_calling_tools_is_stopped(bus, pool, emulator,
                                                           recorder) -> None:
    emulator.default_reply = lambda body: ScriptedReply(
        text="Let me try that again.", tool_uses=(
            ScriptedToolUse(name="transfer_call", input={"to": DESK}),))
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        await open_call(bus, "h4")
        await user_says(bus, "h4", "t1", "Transfer me.")
        for n in range(1, MAX_TOOL_CALLS_PER_TURN + 1):
            requested = (await recorder.wait("tool.requested", "h4", count=n))[-1]
            await bus.publish(ToolFailed(org_id=ORG, call_id="h4",
                                         tool_call_id=requested.tool_call_id,
                                         name="transfer_call", error=REFUSED))
        await recorder.wait("turn.completed", "h4", count=MAX_TOOL_CALLS_PER_TURN + 1)
        await asyncio.sleep(0.5)
        assert len(recorder.of("tool.requested", "h4")) == MAX_TOOL_CALLS_PER_TURN
        assert len(emulator.requests) == MAX_TOOL_CALLS_PER_TURN + 1
        last = recorder.of("agent.say", "h4")[-1]
        assert last.last and last.turn_id == f"t1.{MAX_TOOL_CALLS_PER_TURN}"
    finally:
        await worker.stop()
        await llm.aclose()


def _hand_off_events() -> tuple[list[Event], list[Event], ToolFailed]:
    """A turn's events up to its transfer request; the closing clause and completion; a refusal."""
    def say(seq: int, text: str, last: bool = False) -> AgentSay:
        return AgentSay(org_id=ORG, call_id="c", turn_id="t1", seq=seq, text=text, last=last)

    before: list[Event] = [
        TurnUserEnded(org_id=ORG, call_id="c", turn_id="t1", text="A person, please."),
        say(0, "Let me transfer you."),
        ToolRequested(org_id=ORG, call_id="c", turn_id="t1", tool_call_id="x",
                      name="transfer_call", arguments={"to": DESK})]
    return (before, [say(1, "", last=True), TurnCompleted(org_id=ORG, call_id="c", turn_id="t1")],
            ToolFailed(org_id=ORG, call_id="c", tool_call_id="x", name="transfer_call",
                       error=REFUSED))


def test_a_failed_hand_off_reopens_its_turn_whichever_is_stored_first() -> None:
    before, ending, failed = _hand_off_events()
    went_through = ToolCompleted(org_id=ORG, call_id="c", tool_call_id="x",
                                 name="transfer_call", result={"ok": True})
    for order in itertools.permutations([*ending, failed]):
        turn = fold("c", [*before, *order]).turn("t1")
        assert not turn.completed and not turn.handed_off and not turn.waiting_for_tools
        assert turn.speech == "t1.1" and turn.next_seq == 0 and turn.round_starts == [0, 0]
    for order in itertools.permutations([*ending, went_through]):
        turn = fold("c", [*before, *order]).turn("t1")
        assert turn.handed_off and turn.completed


def test_the_utterance_after_a_failed_hand_off_belongs_to_its_turn() -> None:
    before, ending, failed = _hand_off_events()
    again = [AgentSay(org_id=ORG, call_id="c", turn_id="t1.1", seq=0, text="I can't, sorry."),
             AgentSay(org_id=ORG, call_id="c", turn_id="t1.1", seq=1, text="Anything else?"),
             AgentSpeechInterrupted(org_id=ORG, call_id="c", turn_id="t1.1",
                                    played_text="I can't,")]
    conversation = fold("c", [*before, *ending, failed, *again])
    turn = conversation.turn("t1")
    assert set(conversation.turns) == {"t1"} and turn.interrupted and turn.next_seq == 2
    assert [m.text for m in conversation.llm_messages() if hasattr(m, "text")] == [
        "A person, please.", "Let me transfer you.", "I can't,"]
    finished = fold("c", [*before, *ending, failed, *again[:2],
                          TurnCompleted(org_id=ORG, call_id="c", turn_id="t1")])
    assert finished.turn("t1").completed


async def test_a_hand_off_round_cut_short_is_completed_when_taken_up_again(
        bus, pool, emulator, recorder) -> None:
    """The brain requested a transfer and died before the turn's completion (h-said: its closing
    clause stored; h-open: not even that), and the transfer was refused. The refusal took the
    turn up and completed it once more, but the hand-off's own completion was never published:
    the turn had as many completions as failed hand-offs, and stayed open for good (no
    speculation for the call, a turn that never ends in the record). Now the redelivered turn
    finishes the hand-off's round: closes its speech if still open, and completes it."""
    def transfer_requested(call_id: str, *, closed: bool) -> list[Event]:
        events: list[Event] = [
            AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=0,
                     text="Let me transfer you."),
            ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1", tool_call_id="toolu_t",
                          name="transfer_call", arguments={"to": DESK})]
        if closed:
            events.append(AgentSay(org_id=ORG, call_id=call_id, turn_id="t1", seq=1, text="",
                                   last=True))
        return events

    emulator.default_reply = ScriptedReply(text="I can't transfer you right now.")
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    for call_id, closed in (("h-said", True), ("h-open", False)):
        await open_call(bus, call_id)
        await user_says(bus, call_id, "t1", "A person, please.")
        for event in transfer_requested(call_id, closed=closed):
            await bus.publish(event)
    # h-said: refused before the redelivery; h-open: after it.
    await bus.publish(ToolFailed(org_id=ORG, call_id="h-said", tool_call_id="toolu_t",
                                 name="transfer_call", error=REFUSED))
    worker = BrainWorker(with_hand_offs(services(bus, pool, [llm])))
    await worker.start()
    try:
        await recorder.wait("turn.completed", "h-said", count=2)
        closing, = await recorder.wait("agent.say", "h-open",
                                       where=lambda e: e.last and e.turn_id == "t1")
        assert (closing.turn_id, closing.seq, closing.text) == ("t1", 1, "")
        await recorder.wait("turn.completed", "h-open")
        await bus.publish(ToolFailed(org_id=ORG, call_id="h-open", tool_call_id="toolu_t",
                                     name="transfer_call", error=REFUSED))
        await recorder.wait("turn.completed", "h-open", count=2)
        await asyncio.sleep(0.3)
        for call_id in ("h-said", "h-open"):
            completed = recorder.of("turn.completed", call_id)
            assert len({c.id for c in completed}) == 2, call_id
            turn = fold(call_id, await bus.replay_call(call_id)).turn("t1")
            assert turn.completed and turn.speeches == ["t1", "t1.1"], call_id
            said = [(e.turn_id, e.text) for e in recorder.of("agent.say", call_id)
                    if e.turn_id == "t1.1"]
            assert said == [("t1.1", "I can't transfer you right now.")], call_id
        assert len(emulator.requests) == 2  # the refusals only: the hand-offs are not asked again
    finally:
        await worker.stop()
        await llm.aclose()
