"""An Anthropic Messages API emulator: ``POST /v1/messages``, streamed (SSE) or not.

It checks the API key — ``x-api-key``, or ``Authorization: Bearer`` as anthropic SDK 2.x sends it
— (401 ``authentication_error`` otherwise), the ``anthropic-version`` header every request must
send (400 ``invalid_request_error`` "anthropic-version: header is required", as the API answers
without it) and the request's required
fields (400 ``invalid_request_error``), then answers with the next scripted reply
(:class:`ScriptedReply`: text and/or tool uses, or a function of the request body) — or
``default_reply`` when the queue is empty. A request whose last message is the assistant's is a
prefill, as in the real API: the reply continues it — a scripted text that starts with the
prefill is sent from where the prefill ends. A stream has the real event shapes: ``message_start``
(with usage), ``ping``, ``content_block_start`` (``text`` / ``tool_use``), ``content_block_delta``
(``text_delta`` one word at a time / ``input_json_delta`` with the JSON cut into fragments),
``content_block_stop``, ``message_delta`` (``stop_reason``, usage) and ``message_stop``.

Prompt caching is modelled as the API documents it. A request renders as tools, then system
blocks, then the messages' content blocks (a string content is one text block); a block marked
``cache_control`` (at most 4 in a request, or a 400) ends a prefix — everything before it and the
block itself — that is cached if it is at least the model's minimum (:func:`min_cacheable_tokens`:
4096 tokens for Haiku 4.5, 1024 for Sonnet 4.5…; a shorter one's mark is ignored silently). The
cache key is the model and the prefix's content, ``cache_control`` left out, so a change anywhere
before a mark misses. A request reads the longest cached prefix that ends at one of its marks or
at one of the 20 blocks before a mark (the API's lookback: an entry further back is not found),
writes from there to its last cacheable mark, and bills the rest as ``input_tokens``; reported in
``cache_read_input_tokens`` / ``cache_creation_input_tokens``. Token counts are whitespace words
(:func:`prompt_tokens`: a text block's text, any other block or tool as JSON).

Pacing: ``ttft_s`` before the first content block, then ``tokens_per_second``. Faults
(:class:`AnthropicFaults`): ``fail_next(status)`` answers the next requests with Anthropic's error
JSON (429 ``rate_limit_error`` with its ``retry-after`` header, 500 ``api_error``, 529
``overloaded_error``…), ``stall`` sends
``message_start`` and then nothing, ``error_after_tokens`` sends an ``error`` event mid-stream.
Every request body is kept in :attr:`AnthropicEmulator.requests`; every stream the client
abandoned is recorded in :attr:`AnthropicEmulator.aborted` (with the tokens sent before).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from parley.devkit.emulators import EmulatorServer, run_cli

__all__ = [
    "AbortedStream", "AnthropicEmulator", "AnthropicFaults", "ScriptedReply", "ScriptedToolUse",
    "count_tokens", "json_fragments", "main", "min_cacheable_tokens", "prompt_tokens",
    "word_tokens",
]

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


# The shortest prefix each model caches, from Anthropic's prompt caching page ("minimum
# cacheable prompt length"); first match wins, and a model not listed gets the smallest.
_CACHE_MINIMUMS = ((re.compile(r"claude-(haiku-4-5|opus-4-5|opus-4-6)"), 4096),
                   (re.compile(r"claude-(sonnet-4-6|3-5-haiku|3-haiku|haiku-3)"), 2048))
_SMALLEST_CACHE_MINIMUM = 1024  # Sonnet 4.5, Sonnet 4, Opus 4.1, Opus 4, Sonnet 3.7
CACHE_BREAKPOINTS = 4  # at most, in a request
CACHE_LOOKBACK_BLOCKS = 20  # how far before a mark the API looks for a cached prefix


def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix (tokens) the API caches for ``model``; a shorter one is not cached."""
    for pattern, minimum in _CACHE_MINIMUMS:
        if pattern.match(model):
            return minimum
    return _SMALLEST_CACHE_MINIMUM


@dataclass(frozen=True)
class ScriptedToolUse:
    """A tool call the emulated model makes; ``id`` is generated when omitted.

    ``input`` as a string is the arguments' text as the model wrote it, sent as it is when
    streamed: a model can garble its arguments (a cut-off or unescaped JSON object).
    """

    name: str
    input: dict[str, Any] | str
    id: str | None = None

    @property
    def input_json(self) -> str:
        """The arguments as the streamed reply sends them."""
        return self.input if isinstance(self.input, str) else json.dumps(self.input)


@dataclass(frozen=True)
class ScriptedReply:
    """One reply: text, then tool uses; ``stop_reason`` defaults to ``tool_use`` when any."""

    text: str = ""
    tool_uses: tuple[ScriptedToolUse, ...] = ()
    stop_reason: str | None = None

    @property
    def final_stop_reason(self) -> str:
        """The stop reason reported for this reply."""
        return self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")


Script = ScriptedReply | Callable[[dict[str, Any]], ScriptedReply]


@dataclass
class AnthropicFaults:
    """Switches a test flips to make the emulator misbehave."""

    fail_status: int | None = None
    fail_times: int = 0
    retry_after_s: float | None = None
    stall: bool = False
    error_after_tokens: int | None = None

    def fail_next(self, status: int, *, times: int = 1,
                  retry_after_s: float | None = None) -> None:
        """Answer the next ``times`` requests with ``status`` and Anthropic's error body.

        A 429 carries ``retry-after`` (whole seconds until the limit lets a request through),
        as the real API's do: ``retry_after_s``, 1 s when not given. Another status carries it
        only when ``retry_after_s`` is given.
        """
        self.fail_status = status
        self.fail_times = times
        self.retry_after_s = retry_after_s if retry_after_s is not None or status != 429 else 1.0

    def take_failure(self) -> int | None:
        """The status to fail this request with, if any (consumes one)."""
        if self.fail_status is None or self.fail_times <= 0:
            return None
        self.fail_times -= 1
        return self.fail_status


@dataclass
class AbortedStream:
    """A stream whose client went away before ``message_stop``."""

    tokens_sent: int
    at: float = field(default_factory=time.monotonic)


def word_tokens(text: str) -> list[str]:
    """``text`` as emulated tokens: each word with the whitespace before it."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def count_tokens(value: Any) -> int:
    """A rough token count of any JSON-able value: its whitespace-separated words."""
    text = value if isinstance(value, str) else json.dumps(value)
    return len(text.split())


def prompt_tokens(body: dict[str, Any]) -> int:
    """The tokens of a request's prompt (tools, system, messages), as the emulator counts them."""
    return sum(_block_tokens(block) for block, _ in _rendered(body))


def _rendered(body: dict[str, Any]) -> list[tuple[Any, bool]]:
    """The prompt as the API renders it, tools → system → messages, one item per block.

    Each item: the block without ``cache_control`` (a message's with its role, and whether it
    opens the message), and whether it was marked.
    """
    system = body.get("system")
    blocks: list[tuple[Any, bool]] = [(["tool", _unmarked(t)], _is_marked(t))
                                      for t in body.get("tools") or []]
    blocks += [(["system", _unmarked(b)], _is_marked(b)) for b in (
        [{"type": "text", "text": system}] if isinstance(system, str) else system or [])]
    for message in body["messages"]:
        content = message.get("content")
        for index, block in enumerate([{"type": "text", "text": content}]
                                      if isinstance(content, str) else content or []):
            blocks.append(([message["role"], index == 0, _unmarked(block)], _is_marked(block)))
    return blocks


def _is_marked(block: Any) -> bool:
    return isinstance(block, dict) and "cache_control" in block


def _unmarked(block: Any) -> Any:
    return ({k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict)
            else block)


def _block_tokens(rendered: list[Any]) -> int:
    block = rendered[-1]
    if isinstance(block, dict) and block.get("type") == "text" and rendered[0] != "tool":
        return count_tokens(str(block.get("text", "")))
    return count_tokens(block)


def json_fragments(value: dict[str, Any] | str, size: int = 7) -> list[str]:
    """``value`` as JSON cut into ``size``-character fragments (as input_json_delta sends).

    A string is taken as JSON text already (perhaps not valid: see :class:`ScriptedToolUse`).
    """
    text = value if isinstance(value, str) else json.dumps(value)
    return [text[i:i + size] for i in range(0, len(text), size)]


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error JSON for ``status``."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicEmulator(EmulatorServer):
    """The Messages API with scripted replies, pacing, faults and request recording."""

    def __init__(self, *, api_key: str = "test-key", model: str = "claude-emulated",
                 ttft_s: float = 0.0, tokens_per_second: float | None = None,
                 default_reply: Script | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.model = model
        self.ttft_s = ttft_s
        self.tokens_per_second = tokens_per_second
        self.default_reply: Script = default_reply or ScriptedReply(text="OK.")
        self.scripts: deque[Script] = deque()
        self.faults = AnthropicFaults()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.aborted: list[AbortedStream] = []
        self.completed_streams = 0
        self._cached_prefixes: set[bytes] = set()

    def script(self, *replies: Script) -> None:
        """Queue replies, used in order by the next requests."""
        self.scripts.extend(replies)

    def create_app(self) -> web.Application:
        """The emulator's aiohttp application."""
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if _credential(request) != self.api_key:
            return _error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        problem = _invalid(body)
        if problem:
            return _error(400, problem)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        status = self.faults.take_failure()
        if status is not None:
            retry_after = self.faults.retry_after_s
            return _error(status, {429: "Number of request tokens has exceeded your rate limit",
                                   529: "Overloaded"}.get(status, "Internal server error"),
                          retry_after_s=retry_after)
        script = self.scripts.popleft() if self.scripts else self.default_reply
        reply = _continued(script(body) if callable(script) else script, body["messages"][-1])
        usage = self._usage(body)
        if body.get("stream"):
            return await self._stream(request, reply, usage)
        return web.json_response(self._message(reply, usage))

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        blocks = _rendered(body)
        digest = hashlib.sha256(str(body["model"]).encode())
        keys, totals, marks, total = [], [], [], 0
        for index, (block, marked) in enumerate(blocks):
            digest.update(msgspec.json.encode(block, order="sorted"))
            keys.append(digest.digest())
            total += _block_tokens(block)
            totals.append(total)
            if marked:
                marks.append(index)
        read = 0
        for mark in marks:  # the longest cached prefix a mark finds, looking back
            for index in range(mark, max(mark - CACHE_LOOKBACK_BLOCKS, 0) - 1, -1):
                if keys[index] in self._cached_prefixes:
                    read = max(read, totals[index])
                    break
        minimum = min_cacheable_tokens(str(body["model"]))
        cacheable = [mark for mark in marks if totals[mark] >= minimum]
        for mark in cacheable:
            self._cached_prefixes.add(keys[mark])
        write = max(totals[cacheable[-1]] - read, 0) if cacheable else 0
        return {"input_tokens": total - read - write,
                "cache_creation_input_tokens": write, "cache_read_input_tokens": read}

    def _message(self, reply: ScriptedReply, usage: dict[str, int]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        for use in reply.tool_uses:
            content.append({"type": "tool_use", "id": use.id or _tool_id(), "name": use.name,
                            "input": use.input})
        output = count_tokens(reply.text) + sum(count_tokens(u.input) for u in reply.tool_uses)
        return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                "model": self.model, "content": content, "stop_reason": reply.final_stop_reason,
                "stop_sequence": None, "usage": {**usage, "output_tokens": output}}

    async def _stream(self, request: web.Request, reply: ScriptedReply,
                      usage: dict[str, int]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               "request-id": f"req_{uuid.uuid4().hex[:20]}"})
        try:
            await response.prepare(request)
        except ConnectionError:  # the client gave up (cancelled) before the headers went out
            self.aborted.append(AbortedStream(tokens_sent=0))
            return response
        out = _EventWriter(response)
        sent = 0
        try:
            start = self._message(ScriptedReply(), usage)
            start.update(stop_reason=None, usage={**usage, "output_tokens": 1})
            out.event("message_start", {"type": "message_start", "message": start})
            if self.faults.stall:
                await out.flush()
                await _until_disconnected(request)
                raise ConnectionResetError("the client gave up on a stalled stream")
            out.event("ping", {"type": "ping"})
            if self.ttft_s:
                await out.flush()
                await asyncio.sleep(self.ttft_s)
            index = 0
            if reply.text:
                out.event("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "text", "text": ""}})
                for token in word_tokens(reply.text):
                    sent = await self._token(out, sent, index,
                                             {"type": "text_delta", "text": token})
                out.event("content_block_stop", {"type": "content_block_stop", "index": index})
                index += 1
            for use in reply.tool_uses:
                out.event("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": use.id or _tool_id(),
                                      "name": use.name, "input": {}}})
                for fragment in json_fragments(use.input):
                    sent = await self._token(out, sent, index,
                                             {"type": "input_json_delta",
                                              "partial_json": fragment})
                out.event("content_block_stop", {"type": "content_block_stop", "index": index})
                index += 1
            out.event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": reply.final_stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": sent}})
            out.event("message_stop", {"type": "message_stop"})
            await out.flush()
        except _MidStreamError:
            await out.flush()
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            self.aborted.append(AbortedStream(tokens_sent=sent))
            raise
        except ConnectionError:  # the client hung up mid-stream (it cancelled): nothing to say
            self.aborted.append(AbortedStream(tokens_sent=sent))
            return response
        with contextlib.suppress(ConnectionError):  # a client that read it all may be gone
            await response.write_eof()
        self.completed_streams += 1
        return response

    async def _token(self, out: _EventWriter, sent: int, index: int,
                     delta: dict[str, Any]) -> int:
        if self.faults.error_after_tokens is not None and sent >= self.faults.error_after_tokens:
            out.event("error", error_body(529, "Overloaded"))
            raise _MidStreamError
        if self.tokens_per_second and sent:
            await out.flush()
            await asyncio.sleep(1 / self.tokens_per_second)
        out.event("content_block_delta",
                  {"type": "content_block_delta", "index": index, "delta": delta})
        return sent + 1


class _MidStreamError(Exception):
    """Raised to end a stream right after an ``error`` event."""


async def _until_disconnected(request: web.Request) -> None:
    # aiohttp does not cancel handlers on disconnect and offers no event to await: poll.
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def _invalid(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if not isinstance(body.get(name), kind):
            return f"{name}: Field required"
    if not body["messages"]:
        return "messages: at least one message is required"
    for message in body["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return "messages: each message needs a role of user or assistant"
    roles = [m["role"] for m in body["messages"]]
    if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
        return "messages: roles must alternate between user and assistant"
    marks = sum(marked for _, marked in _rendered(body))
    if marks > CACHE_BREAKPOINTS:
        return (f"A maximum of {CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {marks}.")
    return _empty_text(body["messages"]) or _unpaired_tool_blocks(body["messages"])


def _empty_text(messages: list[dict[str, Any]]) -> str | None:
    """The API's rules on text, as its 400s state them.

    No empty content but a final assistant message's, no empty or blank text block anywhere,
    and no trailing whitespace ending a final assistant message.
    """
    for index, message in enumerate(messages):
        content = message.get("content")
        final_assistant = index == len(messages) - 1 and message["role"] == "assistant"
        if not content and not final_assistant:
            return (f"messages.{index}: all messages must have non-empty content except for "
                    "the optional final assistant message")
        if isinstance(content, str):
            texts = [content] if content else []
        else:
            texts = _blocks(message, "text", "text")
        for text in texts:
            if not isinstance(text, str) or not text:
                return "messages: text content blocks must be non-empty"
            if not text.strip():
                return "messages: text content blocks must contain non-whitespace text"
        if final_assistant and texts and texts[-1] != texts[-1].rstrip():
            return "messages: final assistant content cannot end with trailing whitespace"
    return None


def _blocks(message: dict[str, Any], kind: str, key: str) -> list[Any]:
    content = message.get("content")
    return [block.get(key) for block in content if isinstance(block, dict)
            and block.get("type") == kind] if isinstance(content, list) else []


def _unpaired_tool_blocks(messages: list[dict[str, Any]]) -> str | None:
    """The API's rule: a message's tool uses are answered by results in the very next one."""
    for index, message in enumerate(messages):
        following = messages[index + 1] if index + 1 < len(messages) else None
        used = _blocks(message, "tool_use", "id")
        answered = _blocks(following, "tool_result", "tool_use_id") if following else []
        missing = [tool_id for tool_id in used if tool_id not in answered]
        if used and following is not None and missing:
            return (f"messages.{index + 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(map(str, missing))}. Each "
                    "`tool_use` block must have a corresponding `tool_result` block in the next "
                    "message.")
        previous = _blocks(messages[index - 1], "tool_use", "id") if index else []
        stray = [tool_id for tool_id in _blocks(message, "tool_result", "tool_use_id")
                 if tool_id not in previous]
        if stray:
            return (f"messages.{index}.content: unexpected `tool_use_id` found in "
                    f"`tool_result` blocks: {', '.join(map(str, stray))}. Each `tool_result` "
                    "block must have a corresponding `tool_use` block in the previous message.")
    return None


def _continued(reply: ScriptedReply, last: dict[str, Any]) -> ScriptedReply:
    """``reply`` as the continuation of an assistant prefill (the request's last message)."""
    if last["role"] != "assistant":
        return reply
    content = last.get("content")
    texts = [content] if isinstance(content, str) else [
        block.get("text", "") for block in content or [] if isinstance(block, dict)]
    prefill = texts[-1] if texts else ""  # the model goes on from the message's last block
    if not prefill or not reply.text.startswith(prefill):
        return reply
    return dataclasses.replace(reply, text=reply.text[len(prefill):])


def _credential(request: web.Request) -> str | None:
    """The API key sent as ``x-api-key`` or (as anthropic SDK 2.x does) a bearer token."""
    if "x-api-key" in request.headers:
        return request.headers["x-api-key"]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def _error(status: int, message: str, *, retry_after_s: float | None = None) -> web.Response:
    headers = {"request-id": f"req_{uuid.uuid4().hex[:20]}"}
    if retry_after_s is not None:  # whole seconds, as the API sends it
        headers["retry-after"] = str(math.ceil(retry_after_s))
    return web.json_response(error_body(status, message), status=status, headers=headers)


class _EventWriter:
    """SSE events for one response, sent when the emulated model pauses (or ends).

    Events produced without a pause in between (all of them, when unpaced) go out in one write,
    as a server would send what it has at once, rather than one syscall (and one wake-up of the
    client) per event. Encoded with msgspec: json.dumps was a third of the emulator's time per
    request, which a benchmark with a zero-latency model counts as the model's.
    """

    _encode = msgspec.json.Encoder().encode

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._pending: list[bytes] = []

    def event(self, name: str, data: dict[str, Any]) -> None:
        self._pending += (b"event: ", name.encode(), b"\ndata: ", self._encode(data), b"\n\n")

    async def flush(self) -> None:
        if self._pending:
            chunk = b"".join(self._pending)
            self._pending.clear()
            await self._response.write(chunk)


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def main(argv: list[str] | None = None) -> None:
    """``python -m parley.devkit.emulators.anthropic --port N [--api-key K] [--ttft-ms M]``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--api-key", default="test-key")
        parser.add_argument("--ttft-ms", type=float, default=200.0)
        parser.add_argument("--tokens-per-second", type=float, default=60.0)

    def factory(args: argparse.Namespace) -> AnthropicEmulator:
        return AnthropicEmulator(api_key=args.api_key, ttft_s=args.ttft_ms / 1000,
                                 tokens_per_second=args.tokens_per_second)

    run_cli(factory, "Anthropic Messages API emulator", argv, add_arguments)


if __name__ == "__main__":
    main()
