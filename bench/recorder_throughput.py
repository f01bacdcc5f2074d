"""recorder_throughput: JetStream EVENTS → Postgres event store + inline projections.

Budget (ARCHITECTURE.md §8): recorder → Postgres ≥ 20,000 events/s.

N realistic call events (about 100 per call, ~250 calls live at once; see _workload.py) are
published to EVENTS first, as fast as JetStream takes them (``publish_async`` with a window of
outstanding acks). Then a ``Recorder`` (in-process, batch_size 2000, the ``calls`` and
``audit_log`` projections, as ``python -m parley.recorder`` runs it) is started against a fresh,
migrated database and timed from ``run()`` until its committed checkpoint reaches N. Three runs,
each with a fresh database; the stream is shared.

Postgres runs with fsync on (its default, what production runs), so every batch commit waits for
the WAL to reach the disk. The same runs against a cluster with fsync, synchronous_commit and
full_page_writes off (the test-suite setting) are reported as a second line, without a budget.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from _stats import BenchResult, Budget, Line, throughput_summary
from _workload import traffic

from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus
from parley.common.bus.subjects import event_subject
from parley.common.metrics import Metrics
from parley.recorder.projections import AuditLogProjection, CallsProjection
from parley.recorder.worker import CHECKPOINT, Recorder

BUDGET_EVENTS_PER_S = 20_000
BATCH_SIZE = 2000
RUNS = 3


def sizes(quick: bool) -> tuple[int, int]:
    """(events, calls) for a full or a quick run: ~100 events per call either way."""
    return (10_000, 100) if quick else (100_000, 1_000)


async def publish_traffic(bus: Bus, events: list[ev.Event]) -> float:
    """Publish every event to EVENTS with its id as ``Nats-Msg-Id``; returns seconds taken."""
    js = bus.nc.jetstream(publish_async_max_pending=4000)
    payloads = [(event_subject(e), ev.encode(e), {"Nats-Msg-Id": str(e.id)}) for e in events]
    started = time.perf_counter()
    futures = [await js.publish_async(subject, data, headers=headers)
               for subject, data, headers in payloads]
    await asyncio.wait_for(js.publish_async_completed(), 120)
    seconds = time.perf_counter() - started
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} publishes failed, first: {failed[0]!r}")
    info = await bus.js.stream_info(EVENTS_STREAM)
    if info.state.messages != len(events) or info.state.last_seq != len(events):
        raise RuntimeError(f"EVENTS holds {info.state.messages} messages (last seq "
                           f"{info.state.last_seq}), expected {len(events)}")
    return seconds


async def record_once(bus: Bus, database_url: str, total: int, *, timeout_s: float) -> float:
    """Run a Recorder from an empty database until it has committed ``total``; seconds taken."""
    recorder = Recorder(bus, database_url, [CallsProjection(), AuditLogProjection()],
                        metrics=Metrics("bench"), batch_size=BATCH_SIZE)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(recorder.run(stop), name="bench-recorder")
    try:
        while recorder.position < total:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"recorder stopped at position {recorder.position}")
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"recorder at {recorder.position:,}/{total:,} after "
                                   f"{timeout_s:.0f}s")
            await asyncio.sleep(0.001)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    await _verify(database_url, total)
    return seconds


async def _verify(database_url: str, total: int) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT max(position) FROM events), "
            "(SELECT position FROM checkpoints WHERE name = %s), "
            "(SELECT count(*) FROM dead_letters)", (CHECKPOINT,))
        row = await cursor.fetchone()
    if row != (total, total, total, 0):
        raise RuntimeError(f"store holds (events, max position, checkpoint, dead letters) = "
                           f"{row}, expected ({total}, {total}, {total}, 0)")


async def prepare_stream(ctx: Any) -> tuple[Bus, int, dict[str, Any]]:
    """A bus whose EVENTS stream holds the benchmark traffic (published once per run.py)."""
    total, calls = sizes(ctx.quick)
    events = traffic(total, calls=calls)
    bus = await ctx.servers.clean_bus("bench-recorder")
    ctx.log(f"  publishing {total:,} events ({calls:,} calls) to EVENTS")
    seconds = await publish_traffic(bus, events)
    ctx.log(f"  published in {seconds:.2f}s ({total / seconds:,.0f} events/s)")
    size = sum(len(ev.encode(e)) for e in events)
    return bus, total, {
        "events": f"{total:,} across {calls:,} calls (~250 live at once, "
                  f"{len({e.type for e in events})} types, mean {size / total:.0f} B JSON)",
        "prepublish": f"{seconds:.2f} s ({total / seconds:,.0f} events/s, publish_async)",
    }


async def run(ctx: Any) -> BenchResult:
    """Three timed recorder runs with fsync on, then (full mode) three with fsync off."""
    bus, total, config = await prepare_stream(ctx)
    result = BenchResult("recorder_throughput", config={
        **config, "recorder": f"in-process Recorder, batch_size {BATCH_SIZE}, projections "
                              "calls + audit_log; timed from run() to checkpoint = N",
        "runs": f"{RUNS} per Postgres setting, each into a fresh migrated database"})
    variants = [True] if ctx.quick else [True, False]
    try:
        for fsync in variants:
            rates, walls, cpus = [], [], []
            for number in range(RUNS):
                url = await ctx.servers.fresh_database(fsync=fsync)
                cpu_before = time.process_time()
                seconds = await record_once(bus, url, total, timeout_s=ctx.time_left() - 10)
                # This process runs nothing but the recorder (and a 1 ms poll) meanwhile.
                cpu = time.process_time() - cpu_before
                rates.append(total / seconds)
                walls.append(seconds)
                cpus.append(cpu)
                ctx.log(f"  fsync {'on ' if fsync else 'off'} run {number + 1}: "
                        f"{seconds:.2f}s, {total / seconds:,.0f} events/s, recorder CPU "
                        f"{cpu:.2f}s ({100 * cpu / seconds:.0f}% of wall)")
                if fsync:
                    ctx.shared["recorded_database"] = (url, total)
            summary = throughput_summary(rates, events=total, wall_seconds=walls,
                                         cpu_seconds=cpus)
            result.notes.append(
                f"fsync {'on (Postgres default, budgeted)' if fsync else 'off (test setting)'}: "
                f"the recorder process was on CPU "
                f"{100 * sum(cpus) / sum(walls):.0f}% of the wall time "
                f"({1e6 * sum(cpus) / (total * len(cpus)):.0f} µs of Python per event)")
            result.lines.append(Line(
                f"recorder_throughput.fsync_{'on' if fsync else 'off'}", "events/s",
                summary["median"], summary["worst"], tail_label="worst",
                budget=Budget("median", ">=", BUDGET_EVENTS_PER_S) if fsync else None,
                summary=summary,
                note=("Postgres fsync on (default, honest number; budgeted)" if fsync else
                      "Postgres fsync/synchronous_commit/full_page_writes off "
                      "(test setting; for comparison, no budget)")))
    finally:
        await bus.close()
    return result
