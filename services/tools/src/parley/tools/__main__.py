"""``python -m parley.tools``: tool dispatch to customer APIs, with human approval.

Applies migrations, then runs :class:`parley.tools.worker.ToolsService` — the work-queue
consumers on tool.requested / tool.approved / tool.denied, the approval-deadline sweep and the
approval API on ``PARLEY_TOOLS_HTTP_HOST:PARLEY_TOOLS_HTTP_PORT`` — until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio

from parley.common.service import ServiceContext, serve
from parley.common.store import apply_migrations

from .config import ToolsConfig
from .worker import ToolsService


async def work(ctx: ServiceContext[ToolsConfig], stop: asyncio.Event) -> None:
    """Run the tools service until stopped."""
    await apply_migrations(ctx.config.database_url)
    service = ToolsService(ctx.config, ctx.bus, metrics=ctx.metrics)
    await service.start()
    ctx.ready_checks.append(service.ready)
    try:
        await stop.wait()
    finally:
        await service.stop()


if __name__ == "__main__":
    raise SystemExit(serve("tools", ToolsConfig, work))
