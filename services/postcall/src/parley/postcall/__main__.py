"""``python -m parley.postcall``: summaries, signed webhooks, recordings, caller memory.

Today this runs the service shell only (bus connection, streams, /healthz, /readyz, /metrics)
so `parley up` can supervise the full topology; the postcall's own work lands with its issue.
"""

from __future__ import annotations

import asyncio

from parley.common.config import CommonConfig
from parley.common.service import ServiceContext, serve


async def idle(ctx: ServiceContext[CommonConfig], stop: asyncio.Event) -> None:
    """Hold the connections open until stopped."""
    ctx.settle()
    await stop.wait()


if __name__ == "__main__":
    raise SystemExit(serve("postcall", CommonConfig, idle))
