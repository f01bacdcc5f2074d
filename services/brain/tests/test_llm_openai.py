import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from parley.brain.llm.base import (
    AssistantMessage,
    Done,
    LlmError,
    LlmEvent,
    LlmRequest,
    SystemPrompt,
    TextDelta,
    ToolCall,
    ToolResult,
    ToolSpec,
    ToolUse,
    Usage,
    UsageReported,
    UserMessage,
)
from parley.brain.llm.openai_compat import OpenAICompatLlm
from parley.devkit.emulators.anthropic import count_tokens
from parley.devkit.emulators.openai_compat import (
    OpenAICompatEmulator,
    ScriptedReply,
    ScriptedToolUse,
)

LOOKUP = ToolSpec(name="lookup_order", description="Find an order by number.",
                  input_schema={"type": "object", "properties": {"order": {"type": "string"}}})


@pytest.fixture
async def emulator() -> AsyncIterator[OpenAICompatEmulator]:
    server = OpenAICompatEmulator(api_key="sk-local")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def llm(emulator: OpenAICompatEmulator) -> AsyncIterator[OpenAICompatLlm]:
    provider = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="llama3",
                               api_key="sk-local")
    yield provider
    await provider.aclose()


async def collect(provider: OpenAICompatLlm, request: LlmRequest) -> list[LlmEvent]:
    return [event async for event in provider.stream(request)]


REQUEST = LlmRequest(system=SystemPrompt(text="Be brief."), tools=(LOOKUP,),
                     messages=(UserMessage(text="Where is order 42?"),))


async def test_text_streams_with_usage(emulator: OpenAICompatEmulator,
                                       llm: OpenAICompatLlm) -> None:
    emulator.script(ScriptedReply(text="Your order ships today."))
    events = await collect(llm, REQUEST)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 4 and "".join(deltas) == "Your order ships today."
    done = events[-1]
    assert isinstance(done, Done) and done.stop_reason == "end_turn"
    assert done.usage.output_tokens == 4 and done.usage.input_tokens > 0
    sent = emulator.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["tools"][0]["function"]["name"] == "lookup_order"


async def test_tool_call_fragments_are_assembled(emulator: OpenAICompatEmulator,
                                                 llm: OpenAICompatLlm) -> None:
    arguments = {"order": "42", "include": ["items", "tracking"], "note": "a \"quoted\" word"}
    emulator.script(ScriptedReply(text="Checking.", tool_uses=(
        ScriptedToolUse(name="lookup_order", input=arguments, id="call_7"),
        ScriptedToolUse(name="lookup_order", input={"order": "43"}, id="call_8"))))
    events = await collect(llm, REQUEST)
    assert [e for e in events if isinstance(e, ToolCall)] == [
        ToolCall(id="call_7", name="lookup_order", arguments=arguments),
        ToolCall(id="call_8", name="lookup_order", arguments={"order": "43"})]
    assert isinstance(events[-1], Done) and events[-1].stop_reason == "tool_use"

    follow_up = LlmRequest(messages=(
        *REQUEST.messages, AssistantMessage(text="Checking."),
        ToolUse(id="call_7", name="lookup_order", arguments=arguments),
        ToolResult(tool_use_id="call_7", content='{"status": "shipped"}')))
    await collect(llm, follow_up)
    assert emulator.requests[1]["messages"][1:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_7", "type": "function",
             "function": {"name": "lookup_order", "arguments": '{"order": "42", "include": '
                          '["items", "tracking"], "note": "a \\"quoted\\" word"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"status": "shipped"}'}]


async def test_tool_calls_sent_without_ids_get_ids_that_never_repeat(
        emulator: OpenAICompatEmulator, llm: OpenAICompatLlm) -> None:
    # "call_{index}" gave every call's first tool call the same id: the tools journal took the
    # second for a repeat of the first and never ran it, and the turn waited forever
    emulator.tool_call_ids = False
    lookups = (ScriptedToolUse(name="lookup_order", input={"order": "42"}),
               ScriptedToolUse(name="lookup_order", input={"order": "43"}))
    emulator.script(ScriptedReply(tool_uses=lookups), ScriptedReply(tool_uses=lookups))
    first, second = [[e for e in await collect(llm, REQUEST) if isinstance(e, ToolCall)]
                     for _ in range(2)]
    assert [c.arguments for c in first] == [{"order": "42"}, {"order": "43"}]
    ids = [c.id for c in (*first, *second)]
    assert len(set(ids)) == 4 and all(i.startswith("call_") for i in ids)


async def test_errors_are_classified(emulator: OpenAICompatEmulator,
                                     llm: OpenAICompatLlm) -> None:
    emulator.faults.fail_next(503)
    with pytest.raises(LlmError) as caught:
        await collect(llm, REQUEST)
    assert caught.value.status == 503 and caught.value.retryable

    wrong = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="m", api_key="bad")
    with pytest.raises(LlmError) as caught:
        await collect(wrong, REQUEST)
    assert caught.value.status == 401 and not caught.value.retryable
    assert "Incorrect API key" in caught.value.message
    await wrong.aclose()


@pytest.mark.parametrize(("status", "retry_after", "expected"), [
    (429, None, 1.0), (503, 2.0, 2.0), (500, None, None)])
async def test_the_wait_a_429_or_503_asks_for_goes_with_the_error(
        emulator: OpenAICompatEmulator, llm: OpenAICompatLlm, status: int,
        retry_after: float | None, expected: float | None) -> None:
    """A server's 429 (OpenAI's rate limit) or 503 (a full queue) says when to come back in
    retry-after (or retry-after-ms, as the OpenAI SDK reads them); the provider dropped it, so
    the router retried after its own 0.2 s backoff into another 429. Now it is the error's
    retry_after_s, as AnthropicLlm's, and the router waits at least that (or falls back)."""
    emulator.faults.fail_next(status, retry_after_s=retry_after)
    with pytest.raises(LlmError) as caught:
        await collect(llm, REQUEST)
    assert caught.value.status == status and caught.value.retryable
    assert caught.value.retry_after_s == expected


async def test_the_emulator_refuses_tool_calls_not_answered_at_once_as_the_api_does(
        emulator: OpenAICompatEmulator, llm: OpenAICompatLlm) -> None:
    system = SystemPrompt(text="You help with orders.")
    use = ToolUse(id="call_1", name="lookup_order", arguments={"order": "42"})
    result = ToolResult(tool_use_id="call_1", content='{"status": "shipped"}')
    for messages in [
        (UserMessage(text="Where is order 42?"), use, UserMessage(text="Hello?")),
        (UserMessage(text="Where is order 42?"), use, UserMessage(text="Hello?"),
         AssistantMessage(text="Still looking."), result),
    ]:
        with pytest.raises(LlmError) as refused:
            await collect(llm, LlmRequest(system=system, messages=messages, tools=(LOOKUP,)))
        assert refused.value.status == 400 and "tool" in str(refused.value)
    events = await collect(llm, LlmRequest(system=system, tools=(LOOKUP,), messages=(
        UserMessage(text="Where is order 42?"), use, result)))
    assert isinstance(events[-1], Done)


async def raw_sse_server(events: list[dict[str, Any]], *,
                         done: bool = True) -> tuple[web.AppRunner, str]:
    """A chat completions server that streams exactly ``events`` (then ``[DONE]``, if ``done``)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


@pytest.mark.parametrize("server", ["ollama (every call index 0)", "no index, one chunk"])
async def test_several_tool_calls_stay_apart_when_the_server_numbers_them_all_alike(
        server: str) -> None:
    # Ollama labels every tool call of a response index 0 (each call whole, with its own id);
    # older servers send no index at all. Keyed by index alone, the calls merged into one
    # whose arguments were two JSON objects end to end: "arguments are not JSON", and the
    # turn that asked for two lookups failed.
    first = {"id": "call_a", "type": "function",
             "function": {"name": "lookup_order", "arguments": '{"order": "42"}'}}
    second = {"id": "call_b", "type": "function",
              "function": {"name": "lookup_order", "arguments": '{"order": "43"}'}}
    if server.startswith("ollama"):
        events = [_chunk({"tool_calls": [{**first, "index": 0}]}),
                  _chunk({"tool_calls": [{**second, "index": 0}]})]
    else:
        events = [_chunk({"tool_calls": [first, second]})]
    runner, base_url = await raw_sse_server([*events, _chunk({}, "tool_calls")])
    llm = OpenAICompatLlm(base_url=base_url, model="llama3")
    try:
        calls = [e for e in await collect(llm, REQUEST) if isinstance(e, ToolCall)]
    finally:
        await llm.aclose()
        await runner.cleanup()
    assert calls == [ToolCall(id="call_a", name="lookup_order", arguments={"order": "42"}),
                     ToolCall(id="call_b", name="lookup_order", arguments={"order": "43"})]


async def test_a_stream_closed_before_the_reply_finished_is_an_error() -> None:
    # The connection closed mid-reply (a proxy or the server restarting): no finish_reason, no
    # [DONE]. It was taken for a short, finished answer ("Your order") and the turn completed.
    runner, base_url = await raw_sse_server(
        [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Your order"})],
        done=False)
    llm = OpenAICompatLlm(base_url=base_url, model="llama3")
    received: list[LlmEvent] = []
    try:
        with pytest.raises(LlmError, match="ended before the reply finished") as caught:
            async for event in llm.stream(REQUEST):
                received.append(event)
    finally:
        await llm.aclose()
        await runner.cleanup()
    assert caught.value.retryable
    began, text = received  # no usage came: the consumer counts the estimate it began with
    assert isinstance(began, UsageReported) and began.estimated
    assert began.usage.input_tokens > 0 and text == TextDelta(text="Your order")


async def test_a_stream_that_finished_without_done_is_accepted() -> None:
    # Lenient servers end the stream after the finish_reason chunk without [DONE].
    runner, base_url = await raw_sse_server(
        [_chunk({"content": "Your order ships today."}), _chunk({}, "stop")], done=False)
    llm = OpenAICompatLlm(base_url=base_url, model="llama3")
    try:
        events = await collect(llm, REQUEST)
    finally:
        await llm.aclose()
        await runner.cleanup()
    assert events[1] == TextDelta(text="Your order ships today.")
    assert isinstance(events[-1], Done) and events[-1].stop_reason == "end_turn"


async def test_a_reply_without_usage_reports_an_estimate_and_one_with_usage_reports_it(
        emulator: OpenAICompatEmulator) -> None:
    # Usage comes only in the stream's last chunk, if the server sends it at all: a reply with
    # none ended with zero tokens, though the server billed it.
    text = "Let me look that order up for you."
    arguments = {"order": "42", "note": "the customer asked twice"}
    reply = ScriptedReply(text=text, tool_uses=(
        ScriptedToolUse(name="lookup_order", input=arguments, id="call_1"),))
    emulator.script(reply, reply)
    silent = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="llama3",
                             api_key="sk-local", include_usage=False)
    try:
        began, *_, done = await collect(silent, REQUEST)
    finally:
        await silent.aclose()
    characters = len(json.dumps(emulator.requests[0]))
    assert isinstance(began, UsageReported) and began.estimated
    assert characters / 5 < began.usage.input_tokens < characters / 3
    assert isinstance(done, Done) and done.estimated
    assert done.usage.input_tokens == began.usage.input_tokens
    output = len(text) + len("lookup_order") + len(json.dumps(arguments))
    assert output / 5 < done.usage.output_tokens < output / 3

    llm = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="llama3",
                          api_key="sk-local")
    try:
        began, *_, done = await collect(llm, REQUEST)
    finally:
        await llm.aclose()
    assert isinstance(began, UsageReported) and began.estimated  # until the reply ends
    assert isinstance(done, Done) and not done.estimated
    assert done.usage == Usage(input_tokens=count_tokens(emulator.requests[1]["messages"]),
                               output_tokens=count_tokens(text) + count_tokens(arguments))


@pytest.mark.parametrize("arguments", ['{"order": "42"', '["42"]'])
async def test_tool_arguments_that_are_not_a_json_object_are_a_call_with_an_error(
        emulator: OpenAICompatEmulator, llm: OpenAICompatLlm, arguments: str) -> None:
    # A model that garbled its arguments raised LlmError, and the turn failed or fell back;
    # now it is a tool call whose error the tools service sends back to the model.
    emulator.script(ScriptedReply(text="Checking.", tool_uses=(
        ScriptedToolUse(name="lookup_order", input=arguments, id="call_9"),
        ScriptedToolUse(name="lookup_order", input={"order": "43"}, id="call_10"))))
    events = await collect(llm, REQUEST)
    bad, good = [e for e in events if isinstance(e, ToolCall)]
    assert (bad.id, bad.name, bad.arguments) == ("call_9", "lookup_order", {})
    assert arguments in bad.arguments_error and "JSON" in bad.arguments_error
    assert good == ToolCall(id="call_10", name="lookup_order", arguments={"order": "43"})
    assert isinstance(events[-1], Done) and events[-1].stop_reason == "tool_use"


def rendered(messages: list[dict[str, Any]]) -> str:
    """The prompt a chat template makes of ``messages`` (ChatML, as Qwen's): what a server's
    automatic prefix caching (vLLM, llama.cpp, Ollama) compares, token by token."""
    return "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}"
                   f"{json.dumps(m['tool_calls']) if m.get('tool_calls') else ''}<|im_end|>\n"
                   for m in messages)


async def test_consecutive_requests_share_their_prefix_up_to_the_new_turn(
        bus, pool, emulator: OpenAICompatEmulator, recorder) -> None:
    """A local model's server reuses the KV cache of a prompt's prefix identical to the last
    request's. The turn's context (knowledge, caller profile, call context) was a system
    message before the history: changing every turn, it broke the prefix at the second
    message, and each turn the whole conversation was computed again. Now it ends the final
    message (the caller's words, or the last tool result: a message after a tool result would
    break chat templates that want user and assistant to alternate, Mistral's), in
    <turn_context> tags, and the next request repeats the one before up to it."""
    from parley.brain.knowledge.store import Chunk
    from parley.common.events import ToolCompleted

    from .conftest import ORG, open_call, running_brain, user_says

    async def knowledge(org_id: str, agent_id: str, query: str) -> list[Chunk]:
        return [Chunk(id=f"k-{len(query)}", text=f"What we know about: {query}",
                      source="faq", score=0.9)]

    async def profile(org_id: str, call_id: str, number: str) -> str:
        return "Called twice last month about a crown."

    llm = OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="llama3",
                          api_key="sk-local")
    async with running_brain(bus, pool, [llm], retrieve=knowledge, profile=profile):
        emulator.script(
            ScriptedReply(text="Let me check.", tool_uses=(ScriptedToolUse(
                name="book_appointment", input={"day": "Friday"}, id="call_1"),)),
            ScriptedReply(text="You're booked for Friday at ten."),
            ScriptedReply(text="Yes, we take it."))
        await open_call(bus, "c-prefix")
        await recorder.wait("agent.say", "c-prefix")  # the greeting
        await user_says(bus, "c-prefix", "t1", "Can I come Friday at ten?")
        await recorder.wait("tool.requested", "c-prefix")
        await bus.publish(ToolCompleted(org_id=ORG, call_id="c-prefix", tool_call_id="call_1",
                                        name="book_appointment", result={"booked": True}))
        await recorder.wait("turn.completed", "c-prefix")
        await user_says(bus, "c-prefix", "t2", "Do you take my insurance?")
        await recorder.wait("turn.completed", "c-prefix", count=2)
    requests = [r["messages"] for r in emulator.requests]
    assert len(requests) == 3
    for messages in requests:
        assert [m["role"] for m in messages].count("system") == 1  # the agent's prompt only
        assert "<turn_context>" not in str(messages[:-1])  # only in the final message
        assert messages[-1]["role"] in ("user", "tool")  # the model answers, continues nothing
        assert "Called twice last month" in messages[-1]["content"]
    first, tool_round, second = requests
    assert first[-1]["content"].startswith("Can I come Friday at ten?\n\n<turn_context>\n")
    assert "What we know about: Can I come Friday at ten?" in first[-1]["content"]
    assert tool_round[-1]["role"] == "tool" and tool_round[-1]["content"].startswith(
        '{"booked": true}\n\n<turn_context>\n')  # (nothing after the tool result)
    assert second[-1]["content"].startswith("Do you take my insurance?\n\n<turn_context>\n")
    assert second[-1]["content"].endswith("Do you take my insurance?\n</turn_context>")
    for before, after in ((first, tool_round), (tool_round, second)):
        # The messages are the same up to the final one, which is the same without the context.
        assert after[:len(before) - 1] == before[:-1]
        context = before[-1]["content"].index("\n\n<turn_context>")
        assert after[len(before) - 1] == {**before[-1],
                                          "content": before[-1]["content"][:context]}
        # So the prompt the server computes is the one before up to that turn's context.
        prompt = rendered(before)
        assert rendered(after).startswith(prompt[:prompt.index("\n\n<turn_context>")])
        assert before[-1]["content"].endswith("\n</turn_context>")


def test_the_turns_context_goes_before_a_prefill_and_without_a_conversation_in_the_system() -> None:
    from parley.brain.llm.base import turn_context
    from parley.brain.llm.openai_compat import to_openai_messages

    context = "Knowledge for this turn:\n[faq] Open at 8."
    continuing = LlmRequest(system=SystemPrompt(text="Be brief."), context=context,
                            messages=(UserMessage(text="When do you open?"),),
                            prefill="We open")
    assert to_openai_messages(continuing) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"When do you open?\n\n{turn_context(context)}"},
        {"role": "assistant", "content": "We open"}]  # the reply's, continued: after it
    alone = LlmRequest(system=SystemPrompt(text="Be brief."), context=context, messages=())
    assert to_openai_messages(alone) == [{"role": "system", "content": "Be brief."},
                                         {"role": "system", "content": context}]


async def test_agent_words_of_two_turns_in_a_row_go_out_as_one_assistant_message(
        bus, pool, recorder) -> None:
    """The agent says two things in a row with no caller turn between: the greeting, then the
    idle prompt to a caller who stayed silent ("Are you still there?"); or the words before a
    tool use, then an idle prompt said while the tool ran (which the fold puts before the
    use, 62c539a). Each went out as an assistant message of its own, two in a row, which chat
    templates that want user and assistant to alternate refuse (Mistral's, Gemma's: the
    server answers 500), so the caller's next turn was never answered. They now go out as one
    message, as the Anthropic adapter merges them."""
    from parley.common.events import CallerIdle, ToolCompleted

    from .conftest import ORG, SETTINGS, open_call, running_brain, user_says

    def idle(turn_id: str) -> CallerIdle:
        return CallerIdle(org_id=ORG, call_id="c-alt", turn_id=turn_id, action="prompt",
                          silent_s=8.0)

    server = OpenAICompatEmulator(api_key="sk-local", alternating_roles=True)
    await server.start()
    llm = OpenAICompatLlm(base_url=f"{server.base_url}/v1", model="mistral",
                          api_key="sk-local")
    try:
        async with running_brain(bus, pool, [llm]):
            server.script(
                ScriptedReply(text="Let me check.", tool_uses=(ScriptedToolUse(
                    name="refund", input={"order": "42"}, id="call_alt"),)),
                ScriptedReply(text="Your refund went through."),
                ScriptedReply(text="You're welcome!"))
            await open_call(bus, "c-alt")
            await recorder.wait("agent.say", "c-alt")  # the greeting
            await bus.publish(idle("i0"))
            await recorder.wait("agent.say", "c-alt", where=lambda e: e.turn_id == "i0")
            await user_says(bus, "c-alt", "t1", "Refund my last order.")
            await recorder.wait("tool.requested", "c-alt")
            await bus.publish(idle("i1"))
            await recorder.wait("agent.say", "c-alt", where=lambda e: e.turn_id == "i1")
            await bus.publish(ToolCompleted(org_id=ORG, call_id="c-alt", tool_call_id="call_alt",
                                            name="refund", result={"ok": True}))
            await recorder.wait("turn.completed", "c-alt")
            await user_says(bus, "c-alt", "t2", "Thanks!")
            await recorder.wait("turn.completed", "c-alt", count=2)
    finally:
        await server.stop()
    said = [e.text for e in recorder.of("agent.say", "c-alt")
            if e.turn_id in ("t1", "t2") and not e.filler_after_ms]
    assert said == ["Let me check.", "Your refund went through.", "You're welcome!"]
    first, tool_round, second = [r["messages"] for r in server.requests]
    assert [m["role"] for m in first] == ["system", "assistant", "user"]
    assert first[1]["content"] == f"{SETTINGS.greeting} {SETTINGS.idle_prompt}"
    assert tool_round[2:4] == [
        {"role": "user", "content": "Refund my last order."},
        {"role": "assistant", "content": f"Let me check. {SETTINGS.idle_prompt}",
         "tool_calls": [{"id": "call_alt", "type": "function", "function": {
             "name": "refund", "arguments": '{"order": "42"}'}}]}]
    assert second[:len(tool_round) - 1] == tool_round[:-1]  # (the prefix a server caches)
