"""An OpenAI-compatible chat completions emulator: ``POST /v1/chat/completions``.

The same scripted replies as :mod:`.anthropic` (:class:`ScriptedReply`), answered as the real
service does: with ``stream: true``, ``chat.completion.chunk`` server-sent events (a role chunk,
``delta.content`` one word at a time, ``delta.tool_calls`` with the id and name first and then
the arguments JSON in fragments, a ``finish_reason`` chunk, a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``); otherwise one
``chat.completion`` object. ``Authorization: Bearer <api_key>`` is checked when ``api_key`` is
set; ``fail_next(status)`` answers with OpenAI's error JSON, with ``retry-after`` (whole
seconds) on a 429 (1 s unless ``retry_after_s`` says otherwise) or on any status given a
``retry_after_s``. Bodies land in :attr:`requests`.
With ``tool_call_ids=False`` tool calls carry no id, as some local servers send them. With
``cut_after_tokens`` set, a stream closes after that many tokens (words and argument fragments)
with no ``finish_reason``, usage or ``[DONE]``, as when a proxy or a restarting server drops it.
With ``alternating_roles=True`` a request with two user or two assistant messages in a row is
refused as a chat template that wants them to alternate refuses it (Mistral's, Gemma's:
``raise_exception``, the server answering 500); as Mistral's, tool messages and assistant
messages with ``tool_calls`` are passed over (but an assistant message may come first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

from parley.devkit.emulators import EmulatorServer, run_cli
from parley.devkit.emulators.anthropic import (
    AnthropicFaults,
    Script,
    ScriptedReply,
    ScriptedToolUse,
    count_tokens,
    json_fragments,
    word_tokens,
)

__all__ = ["OpenAICompatEmulator", "ScriptedReply", "ScriptedToolUse", "main"]

_ERROR_TYPES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 400: "invalid_request_error"}


class OpenAICompatEmulator(EmulatorServer):
    """Chat completions with scripted replies, pacing, failures and request recording."""

    def __init__(self, *, api_key: str | None = None, model: str = "emulated-chat",
                 tokens_per_second: float | None = None,
                 default_reply: Script | None = None, tool_call_ids: bool = True,
                 alternating_roles: bool = False) -> None:
        super().__init__()
        self.api_key = api_key
        self.model = model
        self.tokens_per_second = tokens_per_second
        self.default_reply: Script = default_reply or ScriptedReply(text="OK.")
        self.scripts: deque[Script] = deque()
        self.faults = AnthropicFaults()  # only fail_next() applies here (and its retry-after)
        self.requests: list[dict[str, Any]] = []
        self.tool_call_ids = tool_call_ids
        self.cut_after_tokens: int | None = None
        self.alternating_roles = alternating_roles

    def script(self, *replies: Script) -> None:
        """Queue replies, used in order by the next requests."""
        self.scripts.extend(replies)

    def create_app(self) -> web.Application:
        """The emulator's aiohttp application."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        return app

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not body.get("messages") or not body.get("model"):
            return _error(400, "'model' and 'messages' are required")
        problem = _unanswered_tool_calls(body["messages"])
        if problem:
            return _error(400, problem)
        if self.alternating_roles and not _roles_alternate(body["messages"]):
            return _error(500, "Conversation roles must alternate user/assistant/user/assistant/"
                               "...")
        self.requests.append(body)
        status = self.faults.take_failure()
        if status is not None:
            return _error(status, "The server had an error while processing your request.",
                          retry_after_s=self.faults.retry_after_s)
        script = self.scripts.popleft() if self.scripts else self.default_reply
        reply = script(body) if callable(script) else script
        usage = {"prompt_tokens": count_tokens(body["messages"]),
                 "completion_tokens": count_tokens(reply.text)
                 + sum(count_tokens(u.input) for u in reply.tool_uses)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = "tool_calls" if reply.tool_uses else "stop"
        calls: list[dict[str, Any]] = [
            {**({"id": use.id or f"call_{uuid.uuid4().hex[:24]}"} if self.tool_call_ids else {}),
             "type": "function",
             "function": {"name": use.name, "arguments": use.input_json}}
            for use in reply.tool_uses]
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
            if calls:
                message["tool_calls"] = calls
            return web.json_response({**self._envelope("chat.completion"), "usage": usage,
                                      "choices": [{"index": 0, "message": message,
                                                   "finish_reason": finish}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = self._envelope("chat.completion.chunk")
        await self._send(response, chunk, {"role": "assistant", "content": ""})
        deltas: list[dict[str, Any]] = [{"content": token} for token in word_tokens(reply.text)]
        for index, call in enumerate(calls):
            deltas.append({"tool_calls": [{
                "index": index, **({"id": call["id"]} if "id" in call else {}),
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas.extend({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                          for fragment in json_fragments(reply.tool_uses[index].input))
        sent = 0
        try:
            for delta in deltas:
                if "content" in delta or delta["tool_calls"][0]["function"]["arguments"]:
                    if sent == self.cut_after_tokens:
                        await response.write_eof()  # dropped mid-reply
                        return response
                    sent += 1
                    await self._pace()
                await self._send(response, chunk, delta)
            await self._send(response, chunk, {}, finish_reason=finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                await _data(response, {**chunk, "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client hung up mid-stream (it cancelled): nothing to say
            pass
        return response

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.model}

    async def _send(self, response: web.StreamResponse, chunk: dict[str, Any],
                    delta: dict[str, Any], finish_reason: str | None = None) -> None:
        await _data(response, {**chunk, "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    async def _pace(self) -> None:
        if self.tokens_per_second:
            await asyncio.sleep(1 / self.tokens_per_second)


async def _data(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload)}\n\n".encode())


def _error(status: int, message: str, *, retry_after_s: float | None = None) -> web.Response:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {} if retry_after_s is None else {"retry-after": str(math.ceil(retry_after_s))}
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": kind}}, status=status, headers=headers)


def main(argv: list[str] | None = None) -> None:
    """``python -m parley.devkit.emulators.openai_compat --port N [--api-key K]``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--api-key", default=None)
        parser.add_argument("--tokens-per-second", type=float, default=60.0)

    def factory(args: argparse.Namespace) -> OpenAICompatEmulator:
        return OpenAICompatEmulator(api_key=args.api_key,
                                    tokens_per_second=args.tokens_per_second)

    run_cli(factory, "OpenAI-compatible chat completions emulator", argv, add_arguments)


if __name__ == "__main__":
    main()


def _roles_alternate(messages: list[Any]) -> bool:
    """No two user or two assistant messages in a row, tool calls and results passed over."""
    roles = [m.get("role") for m in messages if isinstance(m, dict) and m.get("role") in (
        "user", "assistant") and not m.get("tool_calls")]
    return all(a != b for a, b in zip(roles, roles[1:], strict=False))


def _unanswered_tool_calls(messages: Any) -> str | None:
    """OpenAI's rule: an assistant's tool calls are answered by ``tool`` messages right after.

    Its wording: every ``tool_call_id`` needs a response before any other message, and a
    ``tool`` message must answer a tool call of the assistant message before it.
    """
    if not isinstance(messages, list):
        return "'messages' must be an array"
    waiting: list[str] = []  # the tool calls of the last assistant message not answered yet
    open_calls: set[str] = set()
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            tool_id = message.get("tool_call_id")
            if tool_id not in open_calls:
                return ("Invalid parameter: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'.")
            waiting = [w for w in waiting if w != tool_id]
            continue
        if waiting:
            return ("An assistant message with 'tool_calls' must be followed by tool messages "
                    "responding to each 'tool_call_id'. The following tool_call_ids did not "
                    f"have response messages: {', '.join(waiting)}")
        calls = message.get("tool_calls") if role == "assistant" else None
        waiting = [str(c.get("id")) for c in calls or [] if isinstance(c, dict)]
        open_calls = set(waiting)
    return None
