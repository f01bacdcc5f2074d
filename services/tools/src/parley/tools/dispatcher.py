"""What the tools service does with each event: plan, journal, run, report.

``tool.requested`` → look up the call's agent and the tool, validate the arguments (JSON
Schema), then journal the call in one of three ways: failed at once (unknown tool, invalid
arguments — those that break the schema, or that the model wrote as no JSON object, which the
brain sends as ``arguments_error`` —, a parameters schema that cannot be applied — the error
is phrased for the model), awaiting approval (sensitive tools: the request is acked right
away so nothing waits on a human), or running. A running tool's outcome becomes
``tool.completed`` / ``tool.failed``.

``tool.approved`` → look up the call, claim the approved call and run it (a failure before
the run gives the claim back, so the redelivered decision runs it) — unless its tool was
removed, or its definition changed, since approval was asked for: an approval covers the call
only as the human was asked about it (the definition's fingerprint is journaled with the
request), so such a call fails without running. ``tool.denied`` → record it. The brain reads
one terminal event per tool call: ``tool.completed``, ``tool.failed`` or ``tool.denied``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from nats.aio.msg import Msg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.events import Event, ToolApproved, ToolDenied, ToolRequested
from parley.common.metrics import Metrics
from parley.common.tools.builtin_specs import BUILTIN_SPECS
from parley.common.tools.definitions import (
    HttpTool,
    ToolDefinitionError,
    ToolSpec,
    argument_errors,
)
from parley.common.tools.repository import allows_private_targets, get_secrets, get_tool

from . import journal
from .builtins import UNANSWERED, Builtins
from .call_context import CallContext, CallDirectory
from .http_tool import run_http_tool
from .outcomes import ToolOutcome, without_nul

log = logging.getLogger(__name__)

Tool = HttpTool | ToolSpec


class HttpSessions:
    """The guarded session (public targets only) and the open one (orgs allowing private)."""

    def __init__(self, guarded: aiohttp.ClientSession, open_: aiohttp.ClientSession) -> None:
        self.guarded = guarded
        self.open = open_

    def for_org(self, allow_private: bool) -> aiohttp.ClientSession:
        """The session an org's tools go through."""
        return self.open if allow_private else self.guarded


class Dispatcher:
    """Handles tool.requested and the approval decisions."""

    def __init__(self, *, bus: Bus, pool: AsyncConnectionPool[Any], directory: CallDirectory,
                 builtins: Builtins, sessions: HttpSessions, metrics: Metrics,
                 lease_margin_s: float = 30.0, max_running: int = 256) -> None:
        self.bus = bus
        self.pool = pool
        self.directory = directory
        self.builtins = builtins
        self.sessions = sessions
        self.lease_margin_s = lease_margin_s
        self._outcomes = metrics.counter("tools_outcomes", "Tool calls by how they ended",
                                         ["outcome"])
        self._latency = metrics.histogram("tools_run_seconds", "Time to run a tool")
        # Runs go on after their request is journaled and handed back (see _start): a slow
        # endpoint, or a hang-up waiting for its goodbye to play, holds one of these, not one
        # of the few pullers every other call's tools come through.
        self._slots = asyncio.Semaphore(max_running)
        self._running: set[asyncio.Task[None]] = set()

    async def on_requested(self, event: Event, msg: Msg | None = None) -> None:
        """Journal a requested tool call and run it unless it waits for approval."""
        if not isinstance(event, ToolRequested):
            return
        request = event
        async with self.pool.connection() as conn:
            call = await self.directory.lookup(conn, request.org_id, request.call_id)
            tool = await self._find_tool(conn, call, request.name)
            first: Event | None = None
            state: journal.State
            lease = expires = 0.0
            fingerprint: str | None = None
            if (refusal := self._refusal(request, tool)) is not None:
                state, first = "failed", ToolOutcome.failure(refusal).event(request)
            elif isinstance(tool, HttpTool) and tool.sensitive:
                state, expires = "awaiting_approval", tool.approval_timeout_s
                first = journal.approval_request(request, expires)
                fingerprint = tool.fingerprint()
            else:
                state, lease = "running", self._lease(tool)
            existing = await journal.open_call(conn, request, call.agent_id, state, event=first,
                                               lease_s=lease, expires_in_s=expires,
                                               tool_fingerprint=fingerprint)
            await journal.publish_pending(conn, self.bus, call_id=request.call_id,
                                          tool_call_id=request.tool_call_id)
        if existing is not None:
            log.info("tool call %s already %s; not running it again", request.tool_call_id,
                     existing)
            return
        if state == "failed":
            self._outcomes.labels("failed").inc()
        elif state == "running" and tool is not None:
            await self._start(request, call, tool)

    async def on_decision(self, event: Event, msg: Msg | None = None) -> None:
        """Adopt an approval decision; run the tool if it was approved."""
        if not isinstance(event, ToolApproved | ToolDenied):
            return
        async with self.pool.connection() as conn:
            await journal.accept_decision(conn, event)
            if isinstance(event, ToolDenied):
                self._outcomes.labels("denied").inc()
                return
            # Everything that may fail comes before the claim, or gives it back: a claimed call
            # that does not run would only be failed by the sweep as "may have taken effect".
            call = await self.directory.lookup(conn, event.org_id, event.call_id)
            claimed = await journal.start_approved(conn, event.call_id, event.tool_call_id,
                                                   lease_s=self._lease(None))
            if claimed is None:
                return
            request, _, approved_fingerprint = claimed
            try:
                tool = self._as_approved(request.name,
                                         await self._find_tool(conn, call, request.name),
                                         approved_fingerprint)
                if not isinstance(tool, str):  # the claim could not know the tool: lease it
                    await journal.extend_lease(conn, event.call_id, event.tool_call_id,
                                               lease_s=self._lease(tool))
            except BaseException:
                await journal.unclaim(conn, event.call_id, event.tool_call_id)
                raise
        if isinstance(tool, str):
            log.warning("approved tool call %s not run: %s", request.tool_call_id, tool)
            await self._report(request, ToolOutcome.failure(tool), 0.0)
            return
        await self._start(request, call, tool)

    async def _start(self, request: ToolRequested, call: CallContext, tool: Tool) -> None:
        """Run the tool in the background, once a slot is free; the request is done with.

        Its journal row is "running" under a lease already: if this instance dies mid-run, the
        sweep reports it as it would a redelivered one (a redelivery never runs it again).
        Waiting for a slot here, with all taken, is the back-pressure.
        """
        await self._slots.acquire()
        task = asyncio.create_task(self._run_in_slot(request, call, tool),
                                   name=f"tool:{request.tool_call_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_in_slot(self, request: ToolRequested, call: CallContext, tool: Tool) -> None:
        try:
            await self._run(request, call, tool)
        finally:
            self._slots.release()

    async def drain(self) -> None:
        """Wait for the runs under way (each reports its outcome)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    @staticmethod
    def _refusal(request: ToolRequested, tool: Tool | None) -> str | None:
        """Why the call fails without running (phrased for the model), or None."""
        if tool is None:
            return f"unknown tool {request.name!r}; use only the tools you were given"
        if request.arguments_error:  # the model's arguments could not be read at all
            return (f"invalid arguments for {request.name}: {request.arguments_error}. "
                    "Fix them and call the tool again.")
        if without_nul(request.arguments) != request.arguments:
            return (f"invalid arguments for {request.name}: they contain a NUL character "
                    "(\\u0000); remove it and call the tool again.")
        try:
            errors = argument_errors(tool.parameters, request.arguments)
        except ToolDefinitionError as exc:  # stored before check_schema refused such schemas
            return (f"the tool's parameter schema is unusable: {exc}. {request.name} cannot "
                    "be called; do not retry it.")
        if errors:
            return (f"invalid arguments for {request.name}: {'; '.join(errors)}. "
                    "Fix them and call the tool again.")
        return None

    @staticmethod
    def _as_approved(name: str, tool: Tool | None, approved: str | None) -> HttpTool | str:
        """``tool`` if it is still the one the human approved, else why not (for the model).

        ``approved`` is the fingerprint of the definition the human was asked about; a call
        journaled before fingerprints were kept (None) cannot be checked, so it is refused too.
        """
        if tool is None:
            return (f"{name} did not run: the tool was removed after this call was sent for "
                    "approval.")
        if approved is None:
            return (f"{name} did not run: it was sent for approval before approvals were tied "
                    "to the tool's definition, so the approval cannot be checked against it. "
                    "Call the tool again to ask for a new approval if it is still wanted.")
        if not isinstance(tool, HttpTool) or tool.fingerprint() != approved:
            return (f"{name} did not run: the tool's definition changed after this call was "
                    "sent for approval, so that approval does not cover it. Call the tool "
                    "again to ask for a new approval if it is still wanted.")
        return tool

    async def _find_tool(self, conn: AsyncConnection[Any], call: CallContext,
                         name: str) -> Tool | None:
        if name in BUILTIN_SPECS:
            return BUILTIN_SPECS[name]
        if not call.agent_id:
            return None
        return await get_tool(conn, call.org_id, call.agent_id, name)

    def _lease(self, tool: Tool | None) -> float:
        worst = tool.worst_case_s() if isinstance(tool, HttpTool) else 120.0
        return worst + self.lease_margin_s

    async def _run(self, request: ToolRequested, call: CallContext, tool: Tool) -> None:
        started = time.perf_counter()
        try:
            if isinstance(tool, HttpTool):
                async with self.pool.connection() as conn:
                    secrets = await get_secrets(conn, call.org_id, tool.secret_names())
                    allow_private = await allows_private_targets(conn, call.org_id)
                outcome = await run_http_tool(self.sessions.for_org(allow_private), tool,
                                              request.arguments, secrets=secrets,
                                              tool_call_id=request.tool_call_id,
                                              allow_private=allow_private)
            else:
                outcome = await self._run_builtin(request, call, tool)
        except Exception as exc:  # a bug or an outage: report it, never re-run (see journal)
            log.exception("tool %s (%s) crashed", request.name, request.tool_call_id)
            outcome = ToolOutcome.failure(
                f"the tool failed unexpectedly ({type(exc).__name__})", retryable=True)
        elapsed = time.perf_counter() - started
        self._latency.observe(elapsed)
        await self._report(request, outcome, elapsed * 1000)

    async def _run_builtin(self, request: ToolRequested, call: CallContext,
                           tool: ToolSpec) -> ToolOutcome:
        last_words = UNANSWERED
        if tool.name in ("end_call", "transfer_call"):
            if tool.name == "transfer_call":
                # A transfer that will be refused fails at once, while its last words still
                # play: the brain tells the caller meanwhile, not after them and a silence.
                async with self.pool.connection() as conn:
                    refusal = await self.builtins.transfer_refusal(conn, call,
                                                                   request.arguments["to"])
                if refusal is not None:
                    return refusal
            last_words = await self.builtins.after_speech(  # let the last words play
                call.org_id, call.call_id, request.turn_id)
        async with self.pool.connection() as conn:  # (a transfer target is checked again)
            return await self.builtins.run(conn, tool.name, request.arguments, call,
                                           request.tool_call_id, last_words=last_words)

    async def _report(self, request: ToolRequested, outcome: ToolOutcome,
                      latency_ms: float) -> None:
        event = outcome.event(request, latency_ms=latency_ms)
        async with self.pool.connection() as conn:
            if not await journal.finish(conn, request, event):
                log.warning("tool call %s was no longer running (lease expired?); its outcome "
                            "is dropped", request.tool_call_id)
                return
            await journal.publish_pending(conn, self.bus, call_id=request.call_id,
                                          tool_call_id=request.tool_call_id)
        self._outcomes.labels("completed" if outcome.ok else "failed").inc()
        log.info("tool %s (%s) %s in %.0f ms", request.name, request.tool_call_id,
                 "completed" if outcome.ok else "failed", latency_ms)
