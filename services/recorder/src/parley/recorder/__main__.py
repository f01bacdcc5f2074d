"""``python -m parley.recorder``: record every event into Postgres."""

from __future__ import annotations

import asyncio

from parley.common.service import ServiceContext, serve
from parley.common.store import apply_migrations

from .config import RecorderConfig
from .projections import AuditLogProjection, CallsProjection
from .worker import Recorder


async def record(ctx: ServiceContext[RecorderConfig], stop: asyncio.Event) -> None:
    """Apply migrations, then record until stopped (or stand by while another instance leads)."""
    config = ctx.config
    await apply_migrations(config.database_url)
    recorder = Recorder(ctx.bus, config.database_url, [CallsProjection(), AuditLogProjection()],
                        metrics=ctx.metrics, batch_size=config.recorder_batch_size,
                        crash_point=config.recorder_crash_point,
                        crash_after_batches=config.recorder_crash_after_batches)
    ctx.ready_checks.append(lambda: recorder.ready)
    ctx.settle()
    await recorder.run(stop)


if __name__ == "__main__":
    raise SystemExit(serve("recorder", RecorderConfig, record))
