"""The tools service, composed: consumers, the sweep, HTTP sessions and the approval API.

``ToolsService`` is the composition root. Collaborators may be injected (tests pass a pool and
a knowledge lookup); what it creates it also closes. Work arrives through two durable
work-queue consumers shared by every instance — ``tools-requests`` (tool.requested) and
``tools-decisions`` (tool.approved / tool.denied) — each pulled by ``tools_concurrency``
runners, which journal a request and start its run in the background (up to
``tools_max_running`` at once): slow endpoints and hang-ups waiting for their goodbye never hold
up the other calls' tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus, ConsumerSettings, DurableConsumer, events_of_type
from parley.common.metrics import Metrics

from . import journal
from .approval_api import create_app
from .builtins import Builtins, KnowledgeLookup, knowledge_unavailable
from .call_context import CallDirectory
from .config import ToolsConfig
from .dispatcher import Dispatcher, HttpSessions
from .target_guard import GuardedResolver

log = logging.getLogger(__name__)

REQUESTS_DURABLE = "tools-requests"
DECISIONS_DURABLE = "tools-decisions"


class ToolsService:
    """Runs tools for every instance's share of the work until stopped."""

    def __init__(self, config: ToolsConfig, bus: Bus, *,
                 pool: AsyncConnectionPool[Any] | None = None,
                 knowledge: KnowledgeLookup = knowledge_unavailable,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics or Metrics("tools")
        self.http_port = 0
        self._pool = pool
        self._owns_pool = pool is None
        self._knowledge = knowledge
        self._consumers: list[DurableConsumer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._dispatcher: Dispatcher | None = None
        self._stopping = asyncio.Event()
        self._sessions: list[aiohttp.ClientSession] = []
        self._runner: web.AppRunner | None = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The Postgres pool (available after ``start``)."""
        assert self._pool is not None, "start() first"
        return self._pool

    async def start(self) -> None:
        """Open what is needed, bind the consumers, start the sweep and the approval API."""
        config = self.config
        if self._pool is None:
            self._pool = AsyncConnectionPool(
                config.database_url, min_size=1, max_size=config.db_pool_max_size, open=False,
                kwargs={"autocommit": True}, name="tools")
            await self._pool.open(wait=True, timeout=30.0)
        guarded = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver()), trust_env=False)
        open_ = aiohttp.ClientSession(  # private targets, but never link-local (metadata)
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(private_ok=True)),
            trust_env=False)
        self._sessions = [guarded, open_]
        dispatcher = Dispatcher(
            bus=self.bus, pool=self.pool, directory=CallDirectory(self.bus),
            builtins=Builtins(self.bus.nc, knowledge=self._knowledge,
                              command_timeout_s=config.tools_command_timeout_s,
                              handoff_timeout_s=config.tools_handoff_timeout_s),
            sessions=HttpSessions(guarded, open_), metrics=self.metrics,
            lease_margin_s=config.tools_lease_margin_s, max_running=config.tools_max_running)
        self._dispatcher = dispatcher
        for durable, types, handler in (
                (REQUESTS_DURABLE, ["tool.requested"], dispatcher.on_requested),
                (DECISIONS_DURABLE, ["tool.approved", "tool.denied"], dispatcher.on_decision)):
            settings = ConsumerSettings(
                durable=durable, filter_subjects=[events_of_type(t) for t in types], batch=1,
                ack_wait_s=config.tools_ack_wait_s, max_ack_pending=4 * config.tools_concurrency)
            for _ in range(config.tools_concurrency):
                consumer = DurableConsumer(self.bus, settings, handler)
                await consumer.start()
                self._consumers.append(consumer)
        self._sweeper = asyncio.create_task(self._sweep(), name="tools:sweep")
        self._runner = web.AppRunner(create_app(pool=self.pool, bus=self.bus), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.tools_http_host, config.tools_http_port)
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        log.info("tools approval API on http://%s:%d", config.tools_http_host, self.http_port)

    def ready(self) -> bool:
        """Ready while the sweep runs (the consumers report their own failures in logs)."""
        return self._sweeper is not None and not self._sweeper.done()

    async def stop(self) -> None:
        """Stop taking work, finish what is in hand, close what this service opened."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.gather(*(consumer.stop() for consumer in self._consumers))
        self._consumers.clear()
        if self._dispatcher is not None:  # the runs in hand finish and report
            await self._dispatcher.drain()
            self._dispatcher = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session in self._sessions:
            await session.close()
        self._sessions.clear()
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _sweep(self) -> None:
        """Deny overdue approvals, fail interrupted runs, re-publish stragglers — forever."""
        while not self._stopping.is_set():
            try:
                async with self.pool.connection() as conn:
                    if await journal.expire(conn):
                        await journal.publish_pending(conn, self.bus)
                    await journal.publish_pending(
                        conn, self.bus, older_than_s=self.config.tools_republish_after_s)
            except Exception:  # Postgres or NATS down: the rows wait, try again next round
                log.exception("tools sweep failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.tools_sweep_interval_s)
