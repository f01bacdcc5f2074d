"""``python -m parley.gateway``: telephony webhooks, media sockets, public APIs.

Runs the aiohttp site on ``http_host:http_port`` and the outbox relay (configuration changes
become config events every ``outbox_interval_s``) until SIGTERM/SIGINT; on shutdown every
carrier socket is closed with 1001 GOING_AWAY so the carrier reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from aiohttp import web

from parley.common.bus import Bus
from parley.common.configuration import OutboxRelay
from parley.common.service import ServiceContext, serve
from parley.common.store import apply_migrations

from .app import create_app
from .config import GatewayConfig

log = logging.getLogger(__name__)


async def work(ctx: ServiceContext[GatewayConfig], stop: asyncio.Event) -> None:
    """Serve HTTP and relay the outbox until stopped."""
    config = ctx.config
    await apply_migrations(config.database_url)
    app = create_app(config, bus=ctx.bus, metrics=ctx.metrics)
    runner = web.AppRunner(app, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port)
    await site.start()
    ctx.settle()
    log.info("gateway listening on http://%s:%d (public %s)", config.http_host,
             config.http_port, config.public_base)
    relay = asyncio.create_task(relay_outbox(ctx.bus, config, stop), name="gateway:outbox")
    ctx.ready_checks.append(lambda: not relay.done())
    try:
        await stop.wait()
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        await runner.cleanup()  # on_shutdown closes sockets with GOING_AWAY first


async def relay_outbox(bus: Bus, config: GatewayConfig, stop: asyncio.Event) -> None:
    """Publish committed outbox rows; reconnect to Postgres after errors."""
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(config.database_url,
                                                             autocommit=True) as conn:
                outbox = OutboxRelay(bus, conn)
                while not stop.is_set():
                    await outbox.publish_pending()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), config.outbox_interval_s)
        except Exception:  # Postgres or NATS down: keep trying, the rows wait in the outbox
            log.exception("outbox relay failed; retrying in 1s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


if __name__ == "__main__":
    raise SystemExit(serve("gateway", GatewayConfig, work))
