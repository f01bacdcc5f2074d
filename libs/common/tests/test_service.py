"""The service shell: start-up settling, and the event loop's lag measured."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time

import aiohttp

from parley.common.config import CommonConfig
from parley.common.metrics import Metrics
from parley.common.service import running_service, settle, watch_loop_lag


def walked(obj: object) -> bool:
    """Whether a collection would walk ``obj`` (it is in one of the collector's generations)."""
    return any(candidate is obj for candidate in gc.get_objects())


def test_settle_moves_what_is_loaded_out_of_the_collectors_reach() -> None:
    loaded = [[n] for n in range(1000)]  # what a start-up keeps for good (lists are tracked)
    assert walked(loaded[0])
    try:
        before = gc.get_freeze_count()
        settle()
        assert gc.get_freeze_count() >= before + len(loaded)
        assert not walked(loaded[0])  # never walked again
    finally:
        gc.unfreeze()


async def test_loop_lag_is_measured_when_something_blocks_the_loop() -> None:
    metrics = Metrics("test")
    watcher = asyncio.create_task(watch_loop_lag(metrics, every_s=0.01))
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # noqa: ASYNC251  # on purpose: a callback hogging the loop
        await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
    counts = {sample.labels.get("le"): sample.value
              for family in metrics.registry.collect() if family.name.endswith("loop_lag_seconds")
              for sample in family.samples if sample.name.endswith("_bucket")}
    assert counts["+Inf"] >= 5  # sampled all along
    assert counts["+Inf"] - counts["0.1"] == 1  # one wake-up at least 0.1 s late: the block
    assert counts["0.05"] >= counts["+Inf"] - 1  # the rest on time


async def test_ready_only_from_the_services_start_up_until_it_is_stopping(nats_url: str) -> None:
    # /readyz was green as soon as the shell had connected (models still loading, no consumer
    # bound, no site listening) and stayed green while the service shut down.
    stop = asyncio.Event()
    config = CommonConfig(nats_url=nats_url)
    async with running_service("svc", config, stop=stop) as ctx, \
            aiohttp.ClientSession(f"http://127.0.0.1:{ctx.ops_port}") as http:

        async def readyz() -> int:
            async with http.get("/readyz") as response:
                return response.status

        assert await readyz() == 503  # the service's own start-up has not run
        try:
            ctx.settle()  # what each service's work() calls once it is up
        finally:
            gc.unfreeze()
        assert await readyz() == 200
        stop.set()
        assert await readyz() == 503  # shutting down: take no new work


def test_an_unknown_event_loop_is_a_configuration_error_naming_the_variable() -> None:
    # PARLEY_EVENT_LOOP=foo used to end the service in a ValueError traceback, exit status 1,
    # unlike every other invalid setting (a one-line configuration error, exit status 2).
    script = ("import asyncio\n"
              "from parley.common.config import CommonConfig\n"
              "from parley.common.service import serve\n"
              "async def work(ctx, stop): await stop.wait()\n"
              "raise SystemExit(serve('svc', CommonConfig, work))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PARLEY_EVENT_LOOP": "foo",
                               "PARLEY_NATS_URL": "nats://127.0.0.1:1"}, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "configuration error: PARLEY_EVENT_LOOP='foo'" in done.stderr
    assert "Traceback" not in done.stderr
