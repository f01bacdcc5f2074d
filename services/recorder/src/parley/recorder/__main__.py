"""``python -m parley.recorder``: record every event into Postgres."""

from __future__ import annotations

import asyncio
import logging

from parley.common.bus import Bus, StreamSettings
from parley.common.config import load_config
from parley.common.logging import configure_logging
from parley.common.metrics import Metrics
from parley.common.ops import OpsServer, create_ops_app
from parley.common.runtime import run_service
from parley.common.store import apply_migrations
from parley.common.tracing import configure_tracing

from .config import RecorderConfig
from .projections import AuditLogProjection, CallsProjection
from .worker import Recorder

log = logging.getLogger("parley.recorder")


async def main(stop: asyncio.Event) -> None:
    """Compose the recorder from its config and run it until stopped."""
    config = load_config(RecorderConfig)
    configure_logging("recorder", level=config.log_level)
    configure_tracing("recorder", instance_id=config.instance_id)
    await apply_migrations(config.database_url)
    bus = await Bus.connect(config.nats_url, name="recorder")
    await bus.ensure_streams(StreamSettings(
        replicas=config.events_replicas, events_max_age_s=config.events_max_age_days * 86400,
        audio_max_age_s=config.audio_max_age_minutes * 60))
    metrics = Metrics(service="recorder")
    recorder = Recorder(bus, config.database_url, [CallsProjection(), AuditLogProjection()],
                        metrics=metrics, batch_size=config.recorder_batch_size,
                        crash_point=config.recorder_crash_point,
                        crash_after_batches=config.recorder_crash_after_batches)
    ops = OpsServer(create_ops_app(service="recorder", registry=metrics.registry,
                                   ready=lambda: recorder.leader and bus.nc.is_connected))
    port = await ops.start(config.ops_host, config.ops_port)
    log.info("recorder ops on http://%s:%d (healthz, readyz, metrics)", config.ops_host, port)
    try:
        await recorder.run(stop)
    finally:
        await ops.stop()
        await bus.close()


if __name__ == "__main__":
    raise SystemExit(run_service(main))
