"""projection_rebuild: rebuild the recorder's read models from the stored events.

Budget (ARCHITECTURE.md §8): rebuild of all projections ≥ 50,000 events/s.

Uses the database the recorder_throughput benchmark just filled (fsync on) when both run in
one invocation; run alone, it publishes the same traffic and records it once, untimed. Then
``rebuild(conn, CallsProjection())`` and ``rebuild(conn, AuditLogProjection())`` are each timed,
three times (the first pass over a freshly written table also sets its hint bits, so it is the
slow one and shows up as the worst run). "all" is N divided by the time to rebuild both, which
is what ``parley events rebuild`` of every projection costs; the budget is held by that line.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from _stats import BenchResult, Budget, Line, throughput_summary

from parley.common.store import rebuild
from parley.recorder.projections import AuditLogProjection, CallsProjection

BUDGET_EVENTS_PER_S = 50_000
RUNS = 3


async def _recorded_database(ctx: Any) -> tuple[str, int, str]:
    if "recorded_database" in ctx.shared:
        url, total = ctx.shared["recorded_database"]
        return url, total, "the database recorder_throughput filled (fsync on)"
    import recorder_throughput

    bus, total, _ = await recorder_throughput.prepare_stream(ctx)
    try:
        url = await ctx.servers.fresh_database(fsync=True)
        seconds = await recorder_throughput.record_once(bus, url, total,
                                                        timeout_s=ctx.time_left() - 10)
        ctx.log(f"  recorded {total:,} events in {seconds:.2f}s (untimed setup)")
    finally:
        await bus.close()
    return url, total, "recorded for this benchmark (fsync on)"


async def run(ctx: Any) -> BenchResult:
    """Time each projection's rebuild, three times."""
    url, total, source = await _recorded_database(ctx)
    projections = [CallsProjection(), AuditLogProjection()]
    seconds: dict[str, list[float]] = {p.name: [] for p in projections}
    rows: dict[str, int] = {}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for number in range(RUNS):
            for projection in projections:
                started = time.perf_counter()
                report = await rebuild(conn, projection)  # default batch_size 5000
                elapsed = time.perf_counter() - started
                if report.events != total:
                    raise RuntimeError(f"{projection.name} rebuilt {report.events} events, "
                                       f"expected {total}")
                seconds[projection.name].append(elapsed)
                ctx.log(f"  run {number + 1} {projection.name}: {elapsed:.2f}s, "
                        f"{total / elapsed:,.0f} events/s")
        for table in seconds:
            cursor = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cursor.fetchone()
            rows[table] = row[0] if row else 0
    result = BenchResult("projection_rebuild", config={
        "events": f"{total:,} in {source}",
        "rows": ", ".join(f"{table}: {count:,}" for table, count in rows.items()),
        "rebuild": "parley.common.store.rebuild, batch_size 5000, shadow tables then swap",
        "runs": RUNS,
    })
    budget = Budget("median", ">=", BUDGET_EVENTS_PER_S)
    for name, times in seconds.items():
        summary = throughput_summary([total / s for s in times], events=total, seconds=times)
        result.lines.append(Line(f"projection_rebuild.{name}", "events/s", summary["median"],
                                 summary["worst"], tail_label="worst", summary=summary,
                                 note="one projection alone (info)"))
    both = [sum(times) for times in zip(*seconds.values(), strict=True)]
    summary = throughput_summary([total / s for s in both], events=total, seconds=both)
    result.lines.append(Line("projection_rebuild.all", "events/s", summary["median"],
                             summary["worst"], tail_label="worst", budget=budget,
                             summary=summary,
                             note="N / (time to rebuild calls + audit_log), the budgeted line"))
    return result
