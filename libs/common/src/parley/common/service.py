"""The shell every service runs in: config, logs, tracing, bus, metrics and the ops server.

A service's ``__main__`` is then just its own work::

    async def work(ctx: ServiceContext, stop: asyncio.Event) -> None:
        ...  # load, bind consumers, listen
        ctx.settle()  # start-up done: /readyz is green from here until stop is set
        await stop.wait()

    raise SystemExit(serve("brain", BrainConfig, work))
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .bus import Bus, StreamSettings
from .config import CommonConfig, ConfigError, load_config
from .logging import configure_logging
from .metrics import Metrics
from .ops import OpsServer, create_ops_app
from .runtime import event_loop_kind, run_service, set_niceness
from .tracing import configure_tracing

log = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=CommonConfig)


@dataclass
class ServiceContext(Generic[ConfigT]):
    """What a running service is given: its config and connections, and a readiness hook.

    ``/readyz`` is green only between the service's :meth:`settle` (its models loaded, its
    consumers bound, its sites listening) and ``stopping`` being set (the shutdown began).
    """

    name: str
    config: ConfigT
    bus: Bus
    metrics: Metrics
    ops_port: int = 0
    ready_checks: list[Callable[[], bool]] = field(default_factory=list)
    started: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def ready(self) -> bool:
        """Started, not stopping, connected to NATS, and every registered check passes."""
        return (self.started and not self.stopping.is_set() and self.bus.nc.is_connected
                and all(check() for check in self.ready_checks))

    def settle(self) -> None:
        """The service's own start-up is done: settle it (:func:`settle`), ready from now on.

        Every service's ``work`` calls this once its consumers are bound and its sites listen;
        until then ``/readyz`` answers 503.
        """
        settle()
        self.started = True


def _set_niceness(nice: int) -> None:
    try:
        set_niceness(nice)
    except PermissionError:
        log.warning("running at nice %d, not %d (PARLEY_NICE): a higher priority needs "
                    "CAP_SYS_NICE (systemd: Nice=%d; a container: --cap-add SYS_NICE)",
                    os.getpriority(os.PRIO_PROCESS, 0), nice, nice)
    else:
        log.info("running at nice %d (PARLEY_NICE)", nice)


def settle() -> None:
    """Move everything loaded so far out of the cyclic collector's reach, for good.

    What start-up loads — modules, classes, SDK models, caches — lives as long as the process,
    yet every full collection would walk it again, pausing the event loop (every call the
    process serves) each time. The shell settles once connected, and each service again when
    its own start-up (providers, SDK clients, pools) is done: media imports ~490 modules after
    the shell's settle (the vendor SDKs, the local model runtimes): ~30k objects that every
    full collection walked again. What is left for a full collection is what calls create.
    """
    gc.collect()
    gc.freeze()


LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


async def watch_loop_lag(metrics: Metrics, *, every_s: float = 0.05,
                         warn_after_s: float = 1.0) -> None:
    """Record how late the event loop wakes a sleeper: ``parley_event_loop_lag_seconds``.

    Everything a service does waits its turn on one loop, so this lag is added to every
    frame, event and request it handles at that moment: when a latency's tail grows, this
    says whether the process was busy (or descheduled) rather than the thing it waited for.
    A lag past ``warn_after_s`` is logged (at most once a minute).
    """
    histogram = metrics.histogram("event_loop_lag_seconds",
                                  "How late the event loop woke a timer, sampled every 50 ms",
                                  buckets=LAG_BUCKETS)
    loop = asyncio.get_running_loop()
    warned = -60.0
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        now = loop.time()
        lag = max(0.0, now - due)
        histogram.observe(lag)
        if lag > warn_after_s and now - warned > 60:
            warned = now
            log.warning("event loop %.1f s late: the process is overloaded or was paused", lag)


def stream_settings(config: CommonConfig) -> StreamSettings:
    """Stream replicas and retention from the shared config."""
    return StreamSettings(replicas=config.events_replicas,
                          events_max_age_s=config.events_max_age_days * 86400,
                          audio_max_age_s=config.audio_max_age_minutes * 60)


@contextlib.asynccontextmanager
async def running_service(name: str, config: ConfigT, *, stop: asyncio.Event | None = None,
                          ) -> AsyncIterator[ServiceContext[ConfigT]]:
    """Connect everything a service needs; drain and close it all on exit.

    Once ``stop`` is set the service is no longer ready, while its shutdown runs.
    """
    configure_logging(name, level=config.log_level)
    if config.nice:
        _set_niceness(config.nice)
    configure_tracing(name, instance_id=config.instance_id)
    bus = await Bus.connect(config.nats_url, name=config.instance_id or name)
    try:
        await bus.ensure_streams(stream_settings(config))
        metrics = Metrics(name)
        context = ServiceContext(name=name, config=config, bus=bus, metrics=metrics,
                                 stopping=stop or asyncio.Event())
        ops = OpsServer(create_ops_app(service=name, registry=metrics.registry,
                                       ready=context.ready))
        context.ops_port = await ops.start(config.ops_host, config.ops_port)
        settle()
        log.info("%s up; ops on http://%s:%d (/healthz /readyz /metrics)", name,
                 config.ops_host, context.ops_port)
        lag = asyncio.create_task(watch_loop_lag(metrics), name=f"{name}:loop-lag")
        try:
            yield context
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            await ops.stop()
    finally:
        await bus.close()


def serve(name: str, config_type: type[ConfigT],
          work: Callable[[ServiceContext[ConfigT], asyncio.Event], Awaitable[None]]) -> int:
    """Entry point: load config (exit 2 naming the bad variable), then run until signalled."""
    try:
        config = load_config(config_type)
        event_loop_kind()  # PARLEY_EVENT_LOOP is read by the runtime, checked here with the rest
    except ConfigError as exc:
        print(f"parley.{name}: configuration error: {exc}", file=sys.stderr)
        return 2

    async def main(stop: asyncio.Event) -> None:
        started = asyncio.Event()

        async def body() -> None:
            async with running_service(name, config, stop=stop) as context:
                started.set()
                await work(context, stop)

        task = asyncio.create_task(body(), name=f"{name}:main")
        stopped = asyncio.create_task(stop.wait(), name=f"{name}:stop")
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():  # stopped while still connecting: nothing to drain
            task.cancel()
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return run_service(main)
