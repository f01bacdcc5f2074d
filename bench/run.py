"""Run Parley's benchmarks against real servers and check them against ARCHITECTURE.md §8.

    python bench/run.py [names...] [--check] [--quick] [--out DIR]

Benchmarks: bus_latency, recorder_throughput, projection_rebuild, fold_call, gateway_frames,
media_frame_path, local_stt_latency, piper_ttfa, media_calls, brain_overhead, knowledge_retrieval,
fold_turn, e2e (default: all).
nats-server and Postgres are started from the installed packages on free loopback ports in temp
dirs under /tmp, and stopped and removed at the end. Prints a table, writes ``<out>/<name>.json``
(date, machine, config, raw summaries) and ``<out>/latest.md``; ``out`` is ``bench/results``, or
``bench/results/quick`` with ``--quick`` so a smoke run never overwrites real numbers.

A benchmark is not a test: a missed budget makes the exit status non-zero only with ``--check``.
A benchmark that crashes or runs out of time always does (status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _infra import Servers
from _stats import ERROR, FAIL, BenchResult, render_table, speed_probe, write_results

from parley.common import runtime

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("bus_latency", "recorder_throughput", "projection_rebuild", "fold_call",
              "gateway_frames", "media_frame_path", "local_stt_latency", "piper_ttfa",
              "media_calls", "brain_overhead", "knowledge_retrieval", "fold_turn", "e2e")
# A benchmark is ``<name>.run`` unless it shares a module: name → (module, function).
ENTRY_POINTS = {
    "media_frame_path": ("media", "run_frame_path"),
    "local_stt_latency": ("media", "run_stt_latency"),
    "piper_ttfa": ("media", "run_piper_ttfa"),
    "brain_overhead": ("brain", "run_overhead"),
    "knowledge_retrieval": ("brain", "run_retrieval"),
    "fold_turn": ("brain", "run_fold_turn"),
}
# Wall-clock limit per benchmark in seconds (full, quick), server start-up included.
TIME_LIMITS = {
    "bus_latency": (180, 30),
    "recorder_throughput": (600, 45),
    "projection_rebuild": (300, 45),
    "fold_call": (180, 30),
    "gateway_frames": (300, 45),
    "media_frame_path": (180, 45),
    "local_stt_latency": (240, 60),
    "piper_ttfa": (120, 30),
    "media_calls": (420, 60),
    "brain_overhead": (420, 60),  # mostly sleeps: 300 ms of endpointing silence per turn
    "knowledge_retrieval": (300, 30),
    "fold_turn": (120, 20),
    "e2e": (600, 300),
}


class Context:
    """What a benchmark gets: the servers, the mode, a log, a deadline and shared state."""

    def __init__(self, servers: Servers, *, quick: bool, log: Callable[[str], None]) -> None:
        self.servers = servers
        self.quick = quick
        self.log = log
        self.shared: dict[str, Any] = {}  # e.g. the database recorder_throughput filled
        self.deadline = 0.0

    def time_left(self) -> float:
        """Seconds until the running benchmark's time limit."""
        return self.deadline - time.monotonic()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _run_all(names: list[str], ctx: Context) -> list[BenchResult]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # stop servers on kill, too
    results = []
    for name in names:
        limit = TIME_LIMITS[name][1 if ctx.quick else 0]
        module_name, function = ENTRY_POINTS.get(name, (name, "run"))
        module = importlib.import_module(module_name)
        _log(f"[{name}] (limit {limit}s)")
        probe = speed_probe()
        _log(f"[{name}] speed probe {probe:.1f} ms")
        ctx.deadline = time.monotonic() + limit
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(getattr(module, function)(ctx), limit)
        except Exception as exc:  # report it and go on with the next benchmark
            detail = (f"timed out after {limit}s" if isinstance(exc, TimeoutError) and
                      time.monotonic() >= ctx.deadline else traceback.format_exc())
            _log(f"[{name}] {ERROR}: {detail}")
            result = BenchResult(name, error=detail)
        result.seconds = time.perf_counter() - started
        result.config["speed probe"] = f"{probe:.1f} ms (see bench/README.md)"
        _log(f"[{name}] done in {result.seconds:.1f}s")
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print, write; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a budget is missed")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke run proving the benchmarks still work")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default bench/results[/quick])")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    names = [name for name in BENCHMARKS if name in args.names] or list(BENCHMARKS)
    out = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")

    started = time.perf_counter()
    servers = Servers(log=_log)
    ctx = Context(servers, quick=args.quick, log=_log)
    results: list[BenchResult] = []
    try:
        results = runtime.run(_run_all(names, ctx))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _log("interrupted; stopping servers")
        return 130
    finally:
        with contextlib.suppress(Exception):
            servers.close()
    total = time.perf_counter() - started

    print()
    print(render_table(results))
    for result in results:
        for note in result.notes:
            print(f"  {result.name}: {note}")
    print(f"\n{'quick' if args.quick else 'full'} run of {len(results)} benchmark(s) in "
          f"{total:.1f}s; results in {out}")
    write_results(out, results, quick=args.quick, total_seconds=total)
    if any(result.error for result in results):
        return 2
    if args.check and any(result.status == FAIL for result in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
