"""The gateway's aiohttp application: the composition root of everything behind its port.

``create_app`` wires injected collaborators (tests pass their own bus, pool, clock) and creates
whatever was not injected in a ``cleanup_ctx``, stored under the typed keys of
:mod:`parley.gateway.keys` — nothing connects at import time. Route modules register through
``add_routes(app)`` hooks: Twilio's here, and those of ``parley.gateway.plivo.routes`` and
``parley.gateway.api.routes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, web
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.events import utcnow
from parley.common.metrics import Metrics
from parley.common.problems import problem_middleware
from parley.common.runtime import cancel_and_wait

from . import due_callbacks, orphans, replays
from .api import idempotency
from .api import routes as api_routes
from .api.rate_limit import CallRateLimiter
from .call_outboxes import DRAIN_AT_SHUTDOWN_S, UNCLAIM_AT_SHUTDOWN_S, CallOutboxes
from .config import GatewayConfig
from .keys import (
    BUS,
    CALL_OUTBOXES,
    CALL_RATE_LIMITER,
    CALLS,
    CLOCK,
    CONFIG,
    METRICS,
    POOL,
    SIGNATURE_AUDIT,
    TWILIO_REST,
    Clock,
)
from .plivo import routes as plivo_routes
from .registry import SETTLE_AT_SHUTDOWN_S, CallRegistry
from .signature_audit import FLUSH_AT_SHUTDOWN_S, RefusalFolder, SignatureAudit
from .twilio import media_stream, relay, webhooks
from .twilio.rest import TwilioCalls

log = logging.getLogger(__name__)

RouteHook = Callable[[web.Application], None]

# Each carrier/API package contributes its routes through one function.
ROUTE_HOOKS: tuple[RouteHook, ...] = (
    webhooks.add_routes,
    media_stream.add_routes,
    relay.add_routes,
    plivo_routes.add_routes,
    api_routes.add_routes,
)


def create_app(config: GatewayConfig, *, bus: Bus | None = None,
               db_pool: AsyncConnectionPool[Any] | None = None, clock: Clock = utcnow,
               metrics: Metrics | None = None, twilio_rest: TwilioCalls | None = None,
               ) -> web.Application:
    """Build the gateway app; what is not injected is created (and closed) with the app.

    ``twilio_rest`` defaults to a twilio SDK client when ``twilio_account_sid`` and
    ``twilio_auth_token`` are configured (pointed at ``twilio_api_base_url`` if set), else None:
    call control then falls back to closing sockets and AMD only reports.
    """
    app = web.Application(middlewares=[problem_middleware, replays.give_back_nonces],
                          client_max_size=max(1024 * 1024, config.max_frame_bytes))
    app[CONFIG] = config
    app[CLOCK] = clock
    app[METRICS] = metrics or Metrics("gateway")
    app[CALLS] = CallRegistry()
    app[CALL_RATE_LIMITER] = CallRateLimiter(rate_per_s=config.gateway_call_rate_per_s,
                                             burst=config.gateway_call_burst, clock=clock)
    app.cleanup_ctx.append(_bus_context(bus))
    app.cleanup_ctx.append(_pool_context(db_pool))
    app.cleanup_ctx.append(_signature_audit_context)  # after bus and pool: closed before them
    app.cleanup_ctx.append(_twilio_context(twilio_rest))
    # Drained at shutdown once nothing publishes through them any more: after the loops and
    # the settling of calls whose socket died, before the bus and pool they need.
    app.cleanup_ctx.append(_call_outboxes_context)
    # Stopped before the clients they use. Due callbacks: dialled when due (schedule_callback);
    # orphans: the calls no instance holds (their gateway was killed) are ended.
    app.cleanup_ctx.append(_loop("due-callbacks", due_callbacks.run,
                                 "gateway_callback_interval_s"))
    app.cleanup_ctx.append(_loop("orphaned-calls", orphans.run, "gateway_orphan_check_s"))
    # Idempotency-Keys of POST /v1/calls past their 24 h are deleted.
    app.cleanup_ctx.append(_loop("idempotency-keys", _sweep(
        "idempotency keys", idempotency.expire), "gateway_idempotency_sweep_s"))
    # Plivo nonces past their window and stream tokens a day past theirs, on the same interval.
    app.cleanup_ctx.append(_loop("replay-guards", _sweep(
        "replay-guard rows (nonces, stream tokens)", replays.expire),
        "gateway_idempotency_sweep_s"))
    app.cleanup_ctx.append(_settling_context)  # last: closed before the clients it uses
    app.on_shutdown.append(_going_away)
    for add_routes in ROUTE_HOOKS:
        add_routes(app)
    return app


def _bus_context(bus: Bus | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        if bus is not None:
            app[BUS] = bus
            yield
            return
        owned = await Bus.connect(app[CONFIG].nats_url, name=app[CONFIG].instance_id
                                  or "gateway")
        app[BUS] = owned
        try:
            yield
        finally:
            await owned.close()

    return context


def _pool_context(pool: AsyncConnectionPool[Any] | None,
                  ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        if pool is not None:
            app[POOL] = pool
            yield
            return
        config = app[CONFIG]
        owned: AsyncConnectionPool[Any] = AsyncConnectionPool(
            config.database_url, min_size=1, max_size=config.db_pool_max_size, open=False,
            kwargs={"autocommit": True}, name="gateway")
        await owned.open(wait=True, timeout=30.0)
        app[POOL] = owned
        try:
            yield
        finally:
            await owned.close()

    return context


async def _signature_audit_context(app: web.Application) -> AsyncIterator[None]:
    """The bounded audit of refused signatures, its flushing task, and a last flush."""
    config = app[CONFIG]
    audit = SignatureAudit(bus=app[BUS], pool=app[POOL], clock=app[CLOCK], folder=RefusalFolder(
        interval_s=config.gateway_signature_audit_interval_s,
        max_sources=config.gateway_signature_audit_max_sources))
    app[SIGNATURE_AUDIT] = audit
    task = asyncio.create_task(audit.run(), name="signature-audit")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        # what was folded since the last interval: one publish after another, each waiting up
        # to the publish timeout with NATS away, so bounded as a whole
        await audit.flush_at_shutdown(min(FLUSH_AT_SHUTDOWN_S, app[CALLS].stop_left()))


async def _call_outboxes_context(app: web.Application) -> AsyncIterator[None]:
    """Each call's outbox; at shutdown, what they still hold gets a bounded time to go out."""
    outboxes = app[CALL_OUTBOXES] = CallOutboxes(app[BUS], app[POOL], app[METRICS])
    yield
    # What is left of the stop's budget, less what the ends' claims and the audit's last flush
    # after it may take
    left = app[CALLS].stop_left() - UNCLAIM_AT_SHUTDOWN_S - FLUSH_AT_SHUTDOWN_S
    await outboxes.drain(max(0.0, min(DRAIN_AT_SHUTDOWN_S, left)))


def _twilio_context(rest: TwilioCalls | None,
                    ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        if rest is not None or not (config.twilio_account_sid and config.twilio_auth_token):
            app[TWILIO_REST] = rest
            yield
            return
        owned = TwilioCalls.create(config.twilio_account_sid, config.twilio_auth_token,
                                   base_url=config.twilio_api_base_url)
        app[TWILIO_REST] = owned
        try:
            yield
        finally:
            await owned.close()

    return context


def _loop(name: str, run: Callable[[web.Application], Coroutine[Any, Any, None]],
          setting: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running ``run(app)`` as a task while the app runs.

    When the config's ``setting`` (the loop's interval) is 0, this instance does not run it.
    """
    async def context(app: web.Application) -> AsyncIterator[None]:
        if not getattr(app[CONFIG], setting):
            yield
            return
        task = asyncio.create_task(run(app), name=name)
        try:
            yield
        finally:
            await cancel_and_wait(task)

    return context


def _sweep(what: str, expire: Callable[[web.Application], Awaitable[int]],
           ) -> Callable[[web.Application], Coroutine[Any, Any, None]]:
    """A loop deleting what ``expire`` finds expired every ``gateway_idempotency_sweep_s``."""
    async def run(app: web.Application) -> None:
        interval = app[CONFIG].gateway_idempotency_sweep_s
        while True:
            await asyncio.sleep(interval)
            try:
                if expired := await expire(app):
                    log.info("expired %d %s", expired, what)
            except Exception:  # a database outage: the next round tries again
                log.exception("the sweep of %s failed", what)

    return run


async def _settling_context(app: web.Application) -> AsyncIterator[None]:
    """At shutdown, the calls whose socket died are decided while bus, pool and REST are open."""
    yield
    await app[CALLS].settle_all(min(SETTLE_AT_SHUTDOWN_S, app[CALLS].stop_left()))


async def _going_away(app: web.Application) -> None:
    """Close every carrier socket with 1001 so the carrier reconnects to another instance.

    Calls whose socket died stop waiting for the carrier: they are decided now, while the
    server still waits for their handlers.
    """
    app[CALLS].begin_stop()
    count = len(app[CALLS].sockets)
    if count:
        log.info("closing %d carrier sockets (going away)", count)
    await app[CALLS].close_all(WSCloseCode.GOING_AWAY, b"server shutting down")
