"""A silent caller: the brain says media's idle prompt, and the goodbye before the idle hang-up."""

from __future__ import annotations

import asyncio

import msgspec

from parley.brain.conversation import fold
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.common.configuration import AgentSettings
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    CallerIdle,
    SpeechStarted,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TurnUserEnded,
)
from parley.devkit.emulators.anthropic import ScriptedReply, ScriptedToolUse

from .conftest import ORG, SETTINGS, conversation, open_call, running_brain, user_says

IDLE_PROMPT, IDLE_GOODBYE = SETTINGS.idle_prompt, SETTINGS.idle_goodbye


def idle(call_id: str, turn_id: str, action: str, silent_s: float) -> CallerIdle:
    return CallerIdle(org_id=ORG, call_id=call_id, turn_id=turn_id, action=action,
                      silent_s=silent_s)


def brain_running(bus, pool, emulator, **overrides):
    """conftest's running_brain on the emulated Anthropic model."""
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    return running_brain(bus, pool, [llm], **overrides)


async def test_the_prompt_is_said_and_the_model_knows_it_asked(
        bus, pool, emulator, recorder) -> None:
    async with brain_running(bus, pool, emulator):
        await open_call(bus, "idle1")
        await recorder.wait("agent.say", "idle1")  # the greeting
        await bus.publish(idle("idle1", "i0", "prompt", 8.0))
        [prompt] = await recorder.wait("agent.say", "idle1", where=lambda e: e.turn_id == "i0")
        assert (prompt.seq, prompt.text, prompt.last) == (0, IDLE_PROMPT, True)
        assert prompt.causation_id == recorder.of("caller.idle", "idle1")[0].id
        # The caller answers: the model reads that it asked whether they were there.
        emulator.script(ScriptedReply(text="Great. How can I help?"))
        await user_says(bus, "idle1", "t1", "Yes, sorry, I'm here.")
        await recorder.wait("turn.completed", "idle1")
        messages = conversation(emulator.requests[-1])
        assert messages[-2]["role"] == "assistant" and IDLE_PROMPT in str(messages[-2])
        assert messages[-1] == {"role": "user", "content": "Yes, sorry, I'm here."}
        assert not recorder.of("tool.requested", "idle1")


async def test_the_goodbye_then_the_idle_hang_up_once(bus, pool, emulator, recorder) -> None:
    async with brain_running(bus, pool, emulator):
        await open_call(bus, "idle2")
        await bus.publish(idle("idle2", "i0", "prompt", 8.0))
        await bus.publish(idle("idle2", "i1", "hangup", 30.0))
        [hang_up] = await recorder.wait("tool.requested", "idle2")
        assert (hang_up.turn_id, hang_up.name, hang_up.arguments) == (
            "i1", "end_call", {"reason": "idle"})
        events = await bus.replay_call("idle2")
        goodbye = [e for e in events if isinstance(e, AgentSay) and e.turn_id == "i1"]
        assert [(e.text, e.last) for e in goodbye] == [(IDLE_GOODBYE, True)]
        assert events.index(goodbye[0]) < events.index(
            next(e for e in events if isinstance(e, ToolRequested)))  # said, then hung up
        # The same silence told again (another media instance, a redelivery): nothing twice.
        await bus.publish(idle("idle2", "i1", "hangup", 30.0))
        await bus.publish(idle("idle2", "i0", "prompt", 8.0))
        await asyncio.sleep(0.5)
        assert len(recorder.of("tool.requested", "idle2")) == 1
        assert len(recorder.of("agent.say", "idle2")) == 3  # greeting, prompt, goodbye
        # The hang-up did not happen (the caller spoke over the goodbye): the brain does not
        # take an idle turn up again; the caller's next words are an ordinary turn.
        await bus.publish(AgentSpeechInterrupted(org_id=ORG, call_id="idle2", turn_id="i1",
                                                 played_text="I haven't heard"))
        await bus.publish(ToolFailed(org_id=ORG, call_id="idle2",
                                     tool_call_id=hang_up.tool_call_id, name="end_call",
                                     error="not hung up: the caller spoke over the goodbye"))
        emulator.script(ScriptedReply(text="Of course. What can I do for you?"))
        await user_says(bus, "idle2", "t1", "Wait, I'm here!")
        done = await recorder.wait("turn.completed", "idle2")
        assert [d.turn_id for d in done] == ["t1"]
        messages = conversation(emulator.requests[-1])
        assert "tool_use" not in str(messages) and "tool_result" not in str(messages)
        assert "I haven't heard" in str(messages[-2]) and messages[-1]["content"] == (
            "Wait, I'm here!")


async def test_a_prompt_the_caller_spoke_before_is_not_said(bus, pool, emulator,
                                                            recorder) -> None:
    # Media emitted caller.idle and the caller spoke a moment later, before the brain got to
    # it: media counts a new silence; the prompt would only talk over the caller.
    await open_call(bus, "idle3")
    await bus.publish(idle("idle3", "i0", "prompt", 8.0))
    await bus.publish(SpeechStarted(org_id=ORG, call_id="idle3", offset_ms=12000))
    await bus.publish(idle("idle3", "i1", "hangup", 30.0))
    await bus.publish(TurnUserEnded(org_id=ORG, call_id="idle3", turn_id="t1",
                                    text="Hello?"))
    emulator.script(ScriptedReply(text="Hello! How can I help?"))
    # From here the brain works through the stored events in order.
    async with brain_running(bus, pool, emulator):
        await recorder.wait("turn.completed", "idle3")
        conversation = fold("idle3", await bus.replay_call("idle3"))
        assert [e.turn_id for e in recorder.of("agent.say", "idle3")
                if e.turn_id.startswith("i")] == []
        assert not recorder.of("tool.requested", "idle3") and not conversation.ended


async def test_the_agents_own_words_in_its_language(bus, pool, emulator, recorder) -> None:
    """A Spanish agent asks and says goodbye in Spanish: the words are the agent's settings."""
    spanish = msgspec.structs.replace(
        SETTINGS, language="es-ES", idle_prompt="¿Sigue ahí?",
        idle_goodbye="No le oigo, así que voy a colgar. ¡Adiós!")

    async def agents(org_id: str, agent_id: str) -> AgentSettings:
        return spanish

    async with brain_running(bus, pool, emulator, agents=agents):
        await open_call(bus, "idle9")
        await bus.publish(idle("idle9", "i0", "prompt", 8.0))
        await bus.publish(idle("idle9", "i1", "hangup", 30.0))
        await recorder.wait("tool.requested", "idle9")
        said = {e.turn_id: e.text for e in recorder.of("agent.say", "idle9")}
        assert (said["i0"], said["i1"]) == (spanish.idle_prompt, spanish.idle_goodbye)


async def test_a_prompt_said_while_a_tool_ran_is_no_prefill_of_the_round_after_it(
        bus, pool, emulator, recorder) -> None:
    """A refund waits for approval, the caller says nothing, media asks "Are you still there?":
    the prompt's agent.say is stored between the tool's request and its outcome. The fold put
    it after the tool use, so the request of the round the outcome takes up ended with it once
    its result was moved up to the use (as the API requires): the idle prompt was the
    request's last message, which Anthropic reads as a prefill to continue. It now goes with
    the agent's words before the tool use (it was said while the tool ran), so that round's
    request ends with the tool's result, and the next turn's history keeps that order."""
    async with brain_running(bus, pool, emulator):
        await open_call(bus, "idle10")
        await recorder.wait("agent.say", "idle10")  # the greeting
        emulator.script(
            ScriptedReply(text="Let me check.", tool_uses=(ScriptedToolUse(
                name="refund", input={"order": "42"}, id="toolu_idle10"),)),
            ScriptedReply(text="Your refund went through."),
            ScriptedReply(text="You're welcome!"))
        await user_says(bus, "idle10", "t1", "Refund my last order.")
        await recorder.wait("tool.requested", "idle10")
        await bus.publish(idle("idle10", "i0", "prompt", 8.0))
        await recorder.wait("agent.say", "idle10", where=lambda e: e.turn_id == "i0")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="idle10", tool_call_id="toolu_idle10",
                                        name="refund", result={"ok": True}))
        await recorder.wait("turn.completed", "idle10")
        round_after = conversation(emulator.requests[-1])
        assert round_after[-1] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_idle10", "content": '{"ok": true}'}]}
        assert round_after[-2]["role"] == "assistant" and [
            block.get("text") or block["type"] for block in round_after[-2]["content"]] == [
            "Let me check.", IDLE_PROMPT, "tool_use"]
        said = [e.text for e in recorder.of("agent.say", "idle10") if e.turn_id == "t1"]
        assert said[-1] == "Your refund went through."
        # The caller's next turn: the same history, in the same order, then their words.
        await user_says(bus, "idle10", "t2", "Thanks!")
        await recorder.wait("turn.completed", "idle10", count=2)
        next_turn = conversation(emulator.requests[-1])
        assert next_turn[:len(round_after)] == round_after
        assert next_turn[len(round_after):] == [
            {"role": "assistant", "content": "Your refund went through."},
            {"role": "user", "content": "Thanks!"}]


async def test_a_prompt_said_while_one_of_two_tools_ran_is_no_prefill_either(
        bus, pool, emulator, recorder) -> None:
    """As above with two tools of one response: the order lookup came back, the refund still
    waited for approval, and the prompt's agent.say was stored after the lookup's outcome.
    Only tool uses were passed over to put it before them; it stayed after that outcome, and
    once both results were moved up to their uses the round's request ended with the prompt
    (a prefill). A result of a turn still waiting for its tools is passed over too."""
    async with brain_running(bus, pool, emulator):
        await open_call(bus, "idle11")
        await recorder.wait("agent.say", "idle11")  # the greeting
        emulator.script(
            ScriptedReply(text="Let me check.", tool_uses=(
                ScriptedToolUse(name="lookup_order", input={"order": "42"}, id="toolu_look"),
                ScriptedToolUse(name="refund", input={"order": "42"}, id="toolu_refund"))),
            ScriptedReply(text="Your refund went through."))
        await user_says(bus, "idle11", "t1", "Refund my last order.")
        await recorder.wait("tool.requested", "idle11", count=2)
        await bus.publish(ToolCompleted(org_id=ORG, call_id="idle11", tool_call_id="toolu_look",
                                        name="lookup_order", result={"found": True}))
        await recorder.wait("tool.completed", "idle11")
        await bus.publish(idle("idle11", "i0", "prompt", 8.0))
        await recorder.wait("agent.say", "idle11", where=lambda e: e.turn_id == "i0")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="idle11",
                                        tool_call_id="toolu_refund", name="refund",
                                        result={"ok": True}))
        await recorder.wait("turn.completed", "idle11")
        round_after = conversation(emulator.requests[-1])
        assert [block.get("tool_use_id") for block in round_after[-1]["content"]] == [
            "toolu_look", "toolu_refund"]
        assert [block.get("text") or block["type"] for block in round_after[-2]["content"]] == [
            "Let me check.", IDLE_PROMPT, "tool_use", "tool_use"]
