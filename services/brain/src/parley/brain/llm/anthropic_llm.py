"""Claude through the anthropic SDK: streamed text, streamed tool calls, prompt caching.

The request is sent with ``AsyncAnthropic.messages.create(stream=True)`` and the raw stream events
are mapped to :data:`~parley.brain.llm.base.LlmEvent`: ``text_delta`` → :class:`TextDelta`;
a ``tool_use`` block's ``input_json_delta`` fragments are joined and parsed at
``content_block_stop`` → :class:`ToolCall` (arguments that are not a JSON object: a call with
``arguments_error``, for the model to read, never an error of the stream); usage from
``message_start`` (input, cache read, cache write: at once as :class:`UsageReported`, so a
response cut short still counts what it was billed) and ``message_delta`` (output) →
:class:`Done`.

Prompt caching. The API caches a request's prefix in the order tools → system → messages, up to
a block marked ``cache_control``, and any change before a mark misses the cache. So the stable
part comes first and is marked twice: the system prompt (one text block, when cacheable: the
agent's tools and prompt, shared by every call of the agent) and the conversation's last block
(the caller's words or the tool results: the history, which a call only appends to, so each
turn reads what the turn before wrote, found by the API's lookback of 20 blocks; a response's 8
tool uses and results at most, and the caller's next words, stay within it). The turn's context
(call context, caller profile, knowledge), which changes every turn, goes after that mark: a
text block at the end of the final user message, between ``<turn_context>`` tags that say it is
the platform's reference data, not the caller's words nor instructions (tags inside it are
defused so it cannot close them). Not in the system prompt: a block there changed every turn
would come before the history and break its prefix; and not as instructions, since callers'
words reach the profile and the call's note. After the tool results, as the API requires them
first in their message; last, where the grounding rule ("answer only from the knowledge given
with the caller's words") reads it. The next turn's history no longer carries it, so the
cached prefix stays the same. The API caches a prefix only if it is at least the model's
minimum (4096 tokens for Haiku 4.5, the default; 1024 for Sonnet 4.5), silently: a short call
is billed as plain input every turn (no cache write, no read), a long one is read from the
cache once its history passes the minimum.

The SDK client made here speaks HTTP through aiohttp (``anthropic.DefaultAioHttpClient``, the
SDK's ``aiohttp`` extra) rather than its default httpx transport: per request it costs less
CPU, which is most of a turn's overhead before the first token when the model itself is fast.
Connections are kept alive and reused across turns.

The SDK makes an OpenTelemetry span of each request, and sends its trace context to the API,
only when this process records spans (``spans=None``: :func:`parley.common.tracing.records_spans`,
true once an exporter is configured). Otherwise its spans would record nothing, and preparing
them costs ~12 % of the client's CPU per request (0.19 of 1.6 ms, measured against the
emulator): on a turn's path to its first words, for nothing.

The SDK's own retries are off by default (``max_retries=0``): the router falls back to another
provider faster than a backoff would. The wait a 429 asks for (``retry-after``) goes with the
error (:attr:`LlmError.retry_after_s`), and the router retries no sooner. Closing the event
stream (or cancelling the task that consumes it) closes the HTTP response at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic

from parley.common.tracing import records_spans

from .base import (
    AssistantMessage,
    Done,
    LlmError,
    LlmEvent,
    LlmRequest,
    Message,
    TextDelta,
    ToolCall,
    ToolCallStarted,
    ToolResult,
    ToolUse,
    Usage,
    UsageReported,
    UserMessage,
    read_tool_arguments,
    retry_after_s,
    turn_context,
)

__all__ = ["AnthropicLlm", "retry_after_s", "to_anthropic_messages", "turn_context"]

# Error types Anthropic reports in a stream's ``error`` event, where the HTTP status is a 200.
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429,
                        "invalid_request_error": 400}


class AnthropicLlm:
    """An :class:`~parley.brain.llm.base.LlmProvider` for the Anthropic Messages API.

    Pass ``client`` to share one ``AsyncAnthropic`` (it is then not closed here); otherwise one is
    made from ``api_key``/``base_url`` on first use and closed by :meth:`aclose`. ``spans``:
    whether that client traces its requests (None: when this process records spans).
    """

    supports_tools = True

    def __init__(self, *, api_key: str | None = None, model: str = "claude-haiku-4-5",
                 base_url: str | None = None, client: anthropic.AsyncAnthropic | None = None,
                 name: str = "anthropic", cost: float = 1.0, max_retries: int = 0,
                 timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 spans: bool | None = None) -> None:
        self.name = name
        self.cost = cost
        self.model = model
        self._api_key = api_key
        self._base_url = base_url
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._client = client
        self._owns_client = client is None
        self._clock = clock
        self._spans = spans

    def _get_client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            spans = records_spans() if self._spans is None else self._spans
            self._client = anthropic.AsyncAnthropic(
                api_key=self._api_key, base_url=self._base_url, max_retries=self._max_retries,
                timeout=self._timeout_s, http_client=anthropic.DefaultAioHttpClient(),
                open_telemetry=None if spans else False)
        return self._client

    async def aclose(self) -> None:
        """Close the SDK client if this provider made it."""
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    def request_params(self, request: LlmRequest) -> dict[str, Any]:
        """The ``messages.create`` keyword arguments for ``request`` (without ``stream``)."""
        messages = to_anthropic_messages(request.messages)
        if request.prefill.strip():  # the API refuses a final assistant turn ending in a space
            block = {"type": "text", "text": request.prefill.rstrip()}
            if messages and messages[-1]["role"] == "assistant":  # roles must alternate
                content = messages[-1]["content"]
                messages[-1]["content"] = [
                    *([{"type": "text", "text": content}] if isinstance(content, str)
                      else content), block]
            else:
                messages.append({"role": "assistant", "content": [block]})
        params: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                  "messages": messages}
        if request.system is not None and request.system.text:
            block: dict[str, Any] = {"type": "text", "text": request.system.text}
            if request.system.cacheable:
                block["cache_control"] = {"type": "ephemeral"}
            params["system"] = [block]
        # The conversation's end, marked, then the turn's context: in the final user message
        # (a prefill, after it, is this reply's, so not in the prefix either).
        cacheable = request.system is None or request.system.cacheable
        last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if last_user is not None and (cacheable or request.context):
            content = last_user["content"]
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if cacheable:
                blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
            if request.context:
                blocks.append({"type": "text", "text": turn_context(request.context)})
            last_user["content"] = blocks
        elif request.context:  # no user message to carry it (the API wants one anyway)
            params.setdefault("system", []).append({"type": "text", "text": request.context})
        if request.tools:
            params["tools"] = [{"name": t.name, "description": t.description,
                                "input_schema": t.input_schema} for t in request.tools]
        if request.temperature is not None:
            params["temperature"] = request.temperature
        return params

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmEvent]:
        """Stream Claude's reply to ``request``; SDK errors become :class:`LlmError`."""
        started = self._clock()
        ttft_ms: float | None = None
        usage: dict[str, int] = {}
        stop_reason = "end_turn"
        tools: dict[int, tuple[str, str, list[str]]] = {}  # block index → id, name, fragments
        try:
            events = await self._get_client().messages.create(
                **self.request_params(request), stream=True)
            async with events:
                async for event in events:
                    match event.type:
                        case "message_start":
                            _merge_usage(usage, event.message.usage)
                            yield UsageReported(usage=_usage(usage))
                        case "content_block_start" if event.content_block.type == "tool_use":
                            block = event.content_block
                            tools[event.index] = (block.id, block.name, [])
                            yield ToolCallStarted(name=block.name)
                        case "content_block_delta":
                            delta = event.delta
                            if ttft_ms is None:
                                ttft_ms = (self._clock() - started) * 1000
                            if delta.type == "text_delta" and delta.text:
                                yield TextDelta(text=delta.text)
                            elif delta.type == "input_json_delta" and event.index in tools:
                                tools[event.index][2].append(delta.partial_json)
                        case "content_block_stop" if event.index in tools:
                            tool_id, tool_name, fragments = tools.pop(event.index)
                            arguments, error = read_tool_arguments("".join(fragments))
                            yield ToolCall(id=tool_id, name=tool_name, arguments=arguments,
                                           arguments_error=error)
                        case "message_delta":
                            _merge_usage(usage, event.usage)
                            if event.delta.stop_reason:
                                stop_reason = event.delta.stop_reason
        except anthropic.APIStatusError as exc:
            raise _status_error(self.name, exc) from exc
        except anthropic.APIConnectionError as exc:
            raise LlmError(self.name, f"connection failed: {exc}", retryable=True) from exc
        yield Done(usage=_usage(usage), stop_reason=stop_reason, ttft_ms=ttft_ms)


def to_anthropic_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The conversation as Anthropic messages: alternating roles, tool blocks in content lists.

    Consecutive items of the same role are merged into one message (a reply's text and its tool
    uses; several tool results), as the API requires roles to alternate. A message of one text
    block is sent as the API's shorthand, its text as the content: the SDK copies every dict and
    list of a request before sending it, and for a turn's history the shorthand makes that and
    the encoding cheaper (client CPU per request 1.28 → 1.13 ms for 20 messages and 5 tools).
    """
    result: list[dict[str, Any]] = []
    block: dict[str, Any]
    for message in messages:
        match message:
            case UserMessage(text=text):
                role, block = "user", {"type": "text", "text": text}
            case AssistantMessage(text=text):
                role, block = "assistant", {"type": "text", "text": text}
            case ToolUse(id=tool_id, name=name, arguments=arguments):
                role, block = "assistant", {"type": "tool_use", "id": tool_id, "name": name,
                                            "input": arguments}
            case ToolResult(tool_use_id=tool_id, content=content, is_error=is_error):
                role = "user"
                block = {"type": "tool_result", "tool_use_id": tool_id, "content": content}
                if is_error:
                    block["is_error"] = True
        if block.get("type") == "text" and not block["text"].strip():
            continue  # the API refuses blank text blocks (e.g. an utterance cut to nothing)
        if result and result[-1]["role"] == role:
            result[-1]["content"].append(block)
        else:
            result.append({"role": role, "content": [block]})
    for item in result:
        blocks = item["content"]
        if len(blocks) == 1 and blocks[0]["type"] == "text" and len(blocks[0]) == 2:
            item["content"] = blocks[0]["text"]
    return result


def _usage(usage: dict[str, int]) -> Usage:
    return Usage(input_tokens=usage.get("input_tokens", 0),
                 output_tokens=usage.get("output_tokens", 0),
                 cache_read_tokens=usage.get("cache_read_input_tokens", 0),
                 cache_write_tokens=usage.get("cache_creation_input_tokens", 0))


def _merge_usage(usage: dict[str, int], reported: Any) -> None:
    if reported is None:
        return
    for field in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                  "cache_creation_input_tokens"):
        value = getattr(reported, field, None)
        if value is not None:
            usage[field] = value


def _status_error(provider: str, exc: anthropic.APIStatusError) -> LlmError:
    status = exc.status_code
    if status < 400:  # an ``error`` event inside a 200 stream
        status = _STREAM_ERROR_STATUS.get(exc.type or "", 500)
    return LlmError(provider, exc.api_message or str(exc), status=status,
                    retry_after_s=retry_after_s(exc.response.headers))
