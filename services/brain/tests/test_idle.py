"""A silent caller: the brain says media's idle prompt, and the goodbye before the idle hang-up."""

from __future__ import annotations

import asyncio

import msgspec

from parley.brain.conversation import fold
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.worker import BrainWorker
from parley.common.configuration import AgentSettings
from parley.common.events import (
    AgentSay,
    AgentSpeechInterrupted,
    CallerIdle,
    SpeechStarted,
    ToolFailed,
    ToolRequested,
    TurnUserEnded,
)
from parley.devkit.emulators.anthropic import ScriptedReply

from .conftest import ORG, SETTINGS, conversation, open_call, services, user_says

IDLE_PROMPT, IDLE_GOODBYE = SETTINGS.idle_prompt, SETTINGS.idle_goodbye


def idle(call_id: str, turn_id: str, action: str, silent_s: float) -> CallerIdle:
    return CallerIdle(org_id=ORG, call_id=call_id, turn_id=turn_id, action=action,
                      silent_s=silent_s)


async def test_the_prompt_is_said_and_the_model_knows_it_asked(
        bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
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
    finally:
        await worker.stop()
        await llm.aclose()


async def test_the_goodbye_then_the_idle_hang_up_once(bus, pool, emulator, recorder) -> None:
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()
    try:
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
    finally:
        await worker.stop()
        await llm.aclose()


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
    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm]))
    await worker.start()  # from here the brain works through the stored events in order
    try:
        await recorder.wait("turn.completed", "idle3")
        conversation = fold("idle3", await bus.replay_call("idle3"))
        assert [e.turn_id for e in recorder.of("agent.say", "idle3")
                if e.turn_id.startswith("i")] == []
        assert not recorder.of("tool.requested", "idle3") and not conversation.ended
    finally:
        await worker.stop()
        await llm.aclose()


async def test_the_agents_own_words_in_its_language(bus, pool, emulator, recorder) -> None:
    """A Spanish agent asks and says goodbye in Spanish: the words are the agent's settings."""
    spanish = msgspec.structs.replace(
        SETTINGS, language="es-ES", idle_prompt="¿Sigue ahí?",
        idle_goodbye="No le oigo, así que voy a colgar. ¡Adiós!")

    async def agents(org_id: str, agent_id: str) -> AgentSettings:
        return spanish

    llm = AnthropicLlm(api_key="sk-test", base_url=emulator.base_url)
    worker = BrainWorker(services(bus, pool, [llm], agents=agents))
    await worker.start()
    try:
        await open_call(bus, "idle9")
        await bus.publish(idle("idle9", "i0", "prompt", 8.0))
        await bus.publish(idle("idle9", "i1", "hangup", 30.0))
        await recorder.wait("tool.requested", "idle9")
        said = {e.turn_id: e.text for e in recorder.of("agent.say", "idle9")}
        assert (said["i0"], said["i1"]) == (spanish.idle_prompt, spanish.idle_goodbye)
    finally:
        await worker.stop()
        await llm.aclose()
