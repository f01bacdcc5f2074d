"""Any OpenAI-compatible chat endpoint (Ollama, vLLM, llama.cpp server, OpenAI) over aiohttp.

``POST {base_url}/chat/completions`` with ``stream: true``; ``base_url`` includes the version
prefix, as in the OpenAI SDK (``http://localhost:11434/v1``). The response is server-sent events:
``data: {chat.completion.chunk}`` lines ending with ``data: [DONE]``. Text comes in
``delta.content``; tool calls come in ``delta.tool_calls`` fragments keyed by ``index`` (the id
and name first, then pieces of the ``arguments`` JSON), joined and emitted as :class:`ToolCall`
when the choice finishes (arguments that are not a JSON object: a call with ``arguments_error``,
for the model to read); a call the server sent without an id gets a random one (the id names
the tool call in the tools journal and the conversation, so it must never repeat).
``stream_options.include_usage`` asks for a last chunk with usage (servers that do not know it
ignore it or, with ``include_usage=False``, are not asked). So a response cut short (a barge-in,
a broken stream) would report no usage though the server billed it: as it begins, the response
reports its input estimated from the request body's characters (:class:`UsageReported`,
``estimated``), which the consumer counts with the output that came; its :class:`Done` has the
server's usage or, if none came, the same estimate with the output's characters. A stream that
closes before any ``finish_reason`` or ``[DONE]`` was cut mid-reply (a proxy, a restarting
server) and is a retryable error, never a short finished answer. The wait an error response
asks for (``retry-after-ms`` / ``retry-after``, on a 429 or a 503) goes with the error
(:attr:`LlmError.retry_after_s`), and the router retries no sooner.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec

from .base import (
    AssistantMessage,
    Done,
    LlmError,
    LlmEvent,
    LlmRequest,
    TextDelta,
    ToolCall,
    ToolCallStarted,
    ToolResult,
    ToolUse,
    Usage,
    UsageReported,
    UserMessage,
    estimate_tokens,
    read_tool_arguments,
    retry_after_s,
    turn_context,
    well_formed,
)

__all__ = ["OpenAICompatLlm", "to_openai_messages"]

# How the texts of two messages of a role in a row join into one: the agent's words read on,
# the caller's turns stay apart.
_JOINS = {"assistant": " ", "user": "\n\n"}
_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "function_call": "tool_use",
                 "length": "max_tokens"}


class OpenAICompatLlm:
    """An :class:`~parley.brain.llm.base.LlmProvider` for OpenAI-style chat completions.

    Pass ``session`` to share an ``aiohttp.ClientSession`` (not closed here); otherwise one is
    created on first use and closed by :meth:`aclose`.
    """

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None,
                 session: aiohttp.ClientSession | None = None, name: str = "openai",
                 cost: float = 0.5, supports_tools: bool = True, include_usage: bool = True,
                 timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.cost = cost
        self.supports_tools = supports_tools
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None
        self._include_usage = include_usage
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s,
                                              sock_read=timeout_s)
        self._clock = clock

    async def aclose(self) -> None:
        """Close the HTTP session if this provider made it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def request_body(self, request: LlmRequest) -> dict[str, Any]:
        """The JSON body for ``request``."""
        messages = to_openai_messages(request)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": request.max_tokens}
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if request.tools:
            body["tools"] = [{"type": "function",
                              "function": {"name": t.name, "description": t.description,
                                           "parameters": t.input_schema}}
                             for t in request.tools]
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        """Stream the reply to ``request``; HTTP and connection failures are :class:`LlmError`."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        started = self._clock()
        ttft_ms: float | None = None
        body = json.dumps(self.request_body(request))
        usage: Usage | None = None  # the server's, from the last chunk
        output_characters = 0  # of the text and tool calls received, for an estimate
        stop_reason = "end_turn"
        calls: dict[int, dict[str, Any]] = {}
        finished = False  # a finish_reason or [DONE] came: the server meant the reply to end
        try:
            async with self._session.post(self.url, data=body, headers=headers,
                                          timeout=self._timeout) as response:
                if response.status != 200:
                    raise LlmError(self.name, _error_message(await response.text()),
                                   status=response.status,
                                   retry_after_s=retry_after_s(response.headers))
                estimate = Usage(input_tokens=estimate_tokens(len(body)))
                yield UsageReported(usage=estimate, estimated=True)
                async for chunk in _sse_chunks(response, self.name):
                    if chunk is _END:
                        finished = True
                        continue
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if ttft_ms is None and (delta.get("content") or delta.get("tool_calls")):
                            ttft_ms = (self._clock() - started) * 1000
                        if delta.get("content"):
                            output_characters += len(delta["content"])
                            yield TextDelta(text=well_formed(delta["content"]))
                        for fragment in delta.get("tool_calls") or []:
                            function = fragment.get("function") or {}
                            output_characters += len(function.get("name") or "") + len(
                                function.get("arguments") or "")
                            if _add_fragment(calls, fragment):
                                yield ToolCallStarted(name=calls[max(calls)]["name"])
                        if choice.get("finish_reason"):
                            finished = True
                            stop_reason = _STOP_REASONS.get(choice["finish_reason"],
                                                            choice["finish_reason"])
                            for call in self._complete(calls):
                                yield call
            if not finished:  # the connection closed mid-reply: a proxy, a server restarting
                raise LlmError(self.name, "the stream ended before the reply finished "
                               "(no finish_reason, no [DONE])", retryable=True)
            for call in self._complete(calls):  # servers that never send finish_reason
                yield call
        except aiohttp.ClientResponseError as exc:
            raise LlmError(self.name, exc.message, status=exc.status) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LlmError(self.name, f"connection failed: {exc!r}", retryable=True) from exc
        if usage is None:  # a server that does not send usage
            yield Done(usage=msgspec.structs.replace(
                estimate, output_tokens=estimate_tokens(output_characters)),
                stop_reason=stop_reason, ttft_ms=ttft_ms, estimated=True)
        else:
            yield Done(usage=usage, stop_reason=stop_reason, ttft_ms=ttft_ms)

    def _complete(self, calls: dict[int, dict[str, Any]]) -> list[ToolCall]:
        complete = []
        for index in sorted(calls):
            call = calls.pop(index)
            arguments, error = read_tool_arguments("".join(call["arguments"]))
            complete.append(ToolCall(id=call["id"] or f"call_{uuid.uuid4().hex}",
                                     name=call["name"], arguments=arguments,
                                     arguments_error=error))
        return complete


def to_openai_messages(request: LlmRequest) -> list[dict[str, Any]]:
    """The system prompt, the conversation and the turn's context as OpenAI chat messages.

    An agent's tool uses join the assistant message before them (as ``tool_calls`` with JSON
    ``arguments``); each tool result is a ``tool`` message; a prefill is a last assistant
    message. Texts of one role in a row (the greeting and an idle prompt to a silent caller,
    the words before a tool use and an idle prompt said while it ran, the caller's words of
    two turns) are one message, as for Anthropic: chat templates that want user and
    assistant to alternate (Mistral's, Gemma's) refuse two in a row. The same history always
    joins the same way, so the prefix a request repeats is unchanged.

    The turn's context (call context, caller profile, knowledge), which changes every turn,
    ends the final user or tool message, after the caller's words or the tool's result, in
    :func:`~parley.brain.llm.base.turn_context` tags, as for Anthropic: so each request
    repeats the one before up to that turn's context, and a server's automatic prefix caching
    (vLLM, llama.cpp, Ollama keep the KV cache of the last prompt) computes only the rest. As
    a system message before the history (as it was), it broke that prefix at its second
    message every turn. In the last tool message rather than a user message after it: a
    user message there would be read as the caller's, and chat templates that want user and
    assistant to alternate (not counting tool calls and results: Mistral's, Ministral's,
    Devstral's) refuse it (``raise_exception``: the server answers 500), while one with a
    tool result keeps every template's shape. A request with neither (none is made) has it
    as a system message after the prompt.
    """
    messages: list[dict[str, Any]] = []
    if request.system is not None and request.system.text:
        messages.append({"role": "system", "content": request.system.text})
    for message in request.messages:
        match message:
            case UserMessage(text=text) | AssistantMessage(text=text):
                role = "user" if isinstance(message, UserMessage) else "assistant"
                last = messages[-1] if messages else None
                if last is not None and last["role"] == role and not last.get("tool_calls"):
                    # Two in a row (the greeting and an idle prompt; the caller's words of two
                    # turns) as one message: templates that want roles to alternate refuse them.
                    last["content"] = f"{last['content']}{_JOINS[role]}{text}"
                else:
                    messages.append({"role": role, "content": text})
            case ToolUse(id=tool_id, name=name, arguments=arguments):
                call = {"id": tool_id, "type": "function",
                        "function": {"name": name, "arguments": json.dumps(arguments)}}
                if messages and messages[-1]["role"] == "assistant":
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            case ToolResult(tool_use_id=tool_id, content=content):
                messages.append({"role": "tool", "tool_call_id": tool_id, "content": content})
    if request.context:
        last = next((m for m in reversed(messages) if m["role"] in ("user", "tool")), None)
        if last is not None:
            last["content"] = f"{last['content']}\n\n{turn_context(request.context)}"
        else:
            messages.insert(1 if messages and messages[0]["role"] == "system" else 0,
                            {"role": "system", "content": request.context})
    if request.prefill.strip():  # servers that continue a final assistant message do so
        messages.append({"role": "assistant", "content": request.prefill})
    return messages


_END: dict[str, Any] = {}  # yielded by _sse_chunks for ``[DONE]``, compared by identity


async def _sse_chunks(response: aiohttp.ClientResponse,
                      provider: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of the ``data:`` lines, then :data:`_END` if ``[DONE]`` came."""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": keep-alive"), event names
        data = line[5:].strip()
        if data == "[DONE]":
            yield _END
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise LlmError(provider, f"malformed stream chunk {data[:80]!r}",
                           retryable=True) from exc
        if isinstance(chunk, dict) and chunk.get("error"):
            raise LlmError(provider, _error_message(data), retryable=True)
        yield chunk


def _add_fragment(calls: dict[int, dict[str, Any]], fragment: dict[str, Any]) -> bool:
    """Add a ``delta.tool_calls`` fragment to the call it continues, or start one (True).

    It continues the latest call of its ``index`` (without one: the latest call) unless it
    brings another id: Ollama numbers every call of a response 0, and some servers send no
    index, each call whole with its own id.
    """
    index = fragment.get("index")
    slot = max((s for s, c in calls.items() if index is None or c["index"] == index),
               default=None)
    new_id = fragment.get("id")
    started = slot is None or bool(new_id and calls[slot]["id"] and new_id != calls[slot]["id"])
    if started:
        slot = max(calls, default=-1) + 1
        calls[slot] = {"index": index, "id": "", "name": "", "arguments": []}
    call = calls[slot]
    if fragment.get("id"):
        call["id"] = fragment["id"]
    function = fragment.get("function") or {}
    if function.get("name"):
        call["name"] = function["name"]
    if function.get("arguments"):
        call["arguments"].append(function["arguments"])
    return started


def _usage(reported: dict[str, Any]) -> Usage:
    # prompt_tokens includes the cached ones, which are billed apart (Usage counts them once).
    details = reported.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    return Usage(input_tokens=max((reported.get("prompt_tokens") or 0) - cached, 0),
                 output_tokens=reported.get("completion_tokens") or 0,
                 cache_read_tokens=cached)


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:200] or "no error body"
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
