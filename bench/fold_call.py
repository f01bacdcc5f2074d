"""fold_call: fold one call of 1,000 events into its CallState.

Budget (ARCHITECTURE.md §8): fold one call (1,000 events) into state ≤ 5 ms.

The call is a realistic mix (see _workload.py: set-up, ~45 conversational turns with partial and
final transcripts, clauses, playback marks, usage, the odd tool call and barge-in, hang-up). The
timed unit is one whole fold — ``evolve`` over the 1,000 already-decoded events, starting from
``None`` — repeated many times. A replay (``parley replay <call>``) first has to turn the stored
JSON back into events, so decode + fold is reported as its own line, and decode alone for
reference. Pure CPU, no servers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from _stats import BenchResult, Budget, Line, latency_summary
from _workload import call_events

from parley.common import events as ev
from parley.recorder.domain.call_state import CallState, evolve

BUDGET_MS = 5.0
EVENTS_PER_CALL = 1_000


def _fold(events: list[ev.Event]) -> CallState | None:
    state = None
    for position, event in enumerate(events, 1):
        state = evolve(state, position, event)
    return state


def _decode_and_fold(payloads: list[bytes]) -> CallState | None:
    state = None
    for position, data in enumerate(payloads, 1):
        state = evolve(state, position, ev.decode(data))
    return state


def _decode(payloads: list[bytes]) -> list[ev.Event]:
    return [ev.decode(data) for data in payloads]


def _time(work: Callable[[], object], repetitions: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        work()
    samples = []
    for _ in range(repetitions):
        started = time.perf_counter_ns()
        work()
        samples.append(time.perf_counter_ns() - started)
    return samples


async def run(ctx: Any) -> BenchResult:
    """Time fold, decode + fold and decode over the same call."""
    repetitions = 200 if ctx.quick else 1_000
    warmup = 20 if ctx.quick else 50
    events = call_events(random.Random(1), "org-1", "call-fold", size=EVENTS_PER_CALL)
    payloads = [ev.encode(e) for e in events]
    state = _fold(events)
    if state is None or state.event_count != EVENTS_PER_CALL or state.state != "ended":
        raise RuntimeError(f"unexpected fold result: {state}")
    if _decode_and_fold(payloads) != state:
        raise RuntimeError("decode + fold disagrees with fold")
    types = len({e.type for e in events})
    result = BenchResult("fold_call", config={
        "call": f"{EVENTS_PER_CALL:,} events, {types} types, "
                f"{sum(map(len, payloads)) / 1024:.0f} KiB JSON, {state.turns} turns",
        "repetitions": f"{repetitions:,} per line after {warmup} warm-up",
    })
    cases = [
        ("fold_call.fold", lambda: _fold(events), Budget("tail", "<=", BUDGET_MS),
         "`evolve` over 1,000 decoded events; the budget is unqualified, so it is held by "
         "the p99"),
        ("fold_call.decode_and_fold", lambda: _decode_and_fold(payloads), None,
         "`decode` each JSON payload then `evolve` — what a replay costs (info)"),
        ("fold_call.decode", lambda: _decode(payloads), None,
         "`decode` of the 1,000 payloads alone (info)"),
    ]
    for name, work, budget, note in cases:
        summary = latency_summary(_time(work, repetitions, warmup))
        result.lines.append(Line(name, "ms/call", summary["p50"], summary["p99"],
                                 budget=budget, summary=summary, note=note))
    return result
