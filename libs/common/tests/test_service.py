"""The service shell: start-up settling, and the event loop's lag measured."""

from __future__ import annotations

import asyncio
import gc
import time

from parley.common.metrics import Metrics
from parley.common.service import settle, watch_loop_lag


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
