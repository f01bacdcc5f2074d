"""``python -m parley.media``: per-call audio: VAD, endpointing, STT, TTS, barge-in."""

from __future__ import annotations

import asyncio
import logging
import uuid

from psycopg_pool import AsyncConnectionPool

from parley.common.service import ServiceContext, serve
from parley.media.config import MediaConfig
from parley.media.ownership import Leases, instance_name
from parley.media.session import SessionServices
from parley.media.worker import AgentSettingsCache, MediaWorker, build_routers

log = logging.getLogger("parley.media")


async def run(ctx: ServiceContext[MediaConfig], stop: asyncio.Event) -> None:
    """Load the models, then claim and serve calls until stopped."""
    config = ctx.config
    instance = instance_name(config.instance_id)
    stt, tts = build_routers(config)
    if config.preload_models:
        for provider in (*stt.providers.values(), *tts.providers.values()):
            preload = getattr(provider, "preload", None)
            if preload is not None:
                await preload()
    unknown = ctx.metrics.counter("media_audio_dropped", "Inbound frames with no live session")
    events = ctx.metrics.counter("media_events", "Events the media service emitted", ["type"])
    fenced = ctx.metrics.counter(
        "media_events_fenced", "Events a session held while its lease was unconfirmed (a "
        "frozen or cut-off instance), then dropped: the lease was lost")
    hold_expired = ctx.metrics.counter(
        "media_held_turns_expired", "Caller turns held for the agent's turn to play that went "
        "out before it had: the agent was silent within it too long (its last clause never "
        "came)")
    inbound = ctx.metrics.loop_histogram(  # observed for every frame
        "media_inbound_frame_delay_seconds",
        "Inbound audio frame: how late its session handled it (caught-up frames: since "
        "nats-server stored them; live frames: since they were due by the call's audio clock)",
        (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
         0.25, 0.5, 1.0, 2.5))
    services = SessionServices(
        bus=ctx.bus, instance=instance or uuid.uuid4().hex,
        leases=Leases(ctx.bus, instance, renew_s=config.lease_renew_s,
                      timeout_s=config.lease_timeout_s),
        stt=stt, tts=tts, command_timeout_s=config.command_timeout_s,
        on_unknown_audio=unknown.inc, on_event=lambda kind: events.labels(kind).inc(),
        on_fenced=fenced.inc, on_inbound_frame=inbound.observe, on_hold_expired=hold_expired.inc)
    async with AsyncConnectionPool(config.database_url, min_size=1, max_size=4,
                                   open=False) as pool:
        worker = MediaWorker(services, AgentSettingsCache(pool, config.agent_cache_s),
                             metrics=ctx.metrics)
        await worker.start()
        ctx.settle()
        log.info("media ready: instance %s, stt %s, tts %s", instance, ",".join(stt.default_chain),
                 ",".join(tts.default_chain))
        try:
            await stop.wait()
        finally:
            await worker.stop()


if __name__ == "__main__":
    raise SystemExit(serve("media", MediaConfig, run))
