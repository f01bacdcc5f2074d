"""Where the recorder's time goes: one recorder_throughput run under cProfile.

    python bench/profile_recorder.py [--events N] [--fsync on|off] [--top 40] [--out FILE]

Publishes the benchmark traffic, runs one timed Recorder pass under cProfile, and prints the
recorder process's CPU time against the wall time (how much is Python, how much is waiting on
Postgres/NATS), the Postgres backends' CPU time, and the top functions by cumulative and by own
time. ``--out`` keeps the raw profile for ``python -m pstats``/snakeviz.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

from _infra import Servers
from _workload import traffic
from recorder_throughput import publish_traffic, record_once


def _postgres_cpu_seconds(postmaster: int) -> float:
    """CPU of the postmaster, its live children, and (reaped into cutime) its exited ones."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after "(comm)": state ppid ... utime(11) stime(12) cutime(13) cstime(14).
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == postmaster:
            total += sum(int(value) for value in fields[11:15])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


async def _main(args: argparse.Namespace) -> None:
    servers = Servers(log=lambda message: print(message, file=sys.stderr))
    try:
        events = traffic(args.events, calls=max(args.events // 100, 1))
        bus = await servers.clean_bus("profile-recorder")
        await publish_traffic(bus, events)
        del events
        fsync = args.fsync == "on"
        server = await servers.postgres(fsync=fsync)
        assert server.pid is not None
        profiler = cProfile.Profile()
        for label, profile in (("plain", None), ("under cProfile", profiler)):
            url = await servers.fresh_database(fsync=fsync)
            pg_before = _postgres_cpu_seconds(server.pid)
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            seconds = await record_once(bus, url, args.events, timeout_s=300)
            if profile is not None:
                profile.disable()
            cpu = time.process_time() - cpu_before
            wall = time.perf_counter() - wall_before
            pg_cpu = _postgres_cpu_seconds(server.pid) - pg_before
            print(f"{label}: {args.events:,} events in {seconds:.2f}s "
                  f"({args.events / seconds:,.0f} events/s); recorder process CPU {cpu:.2f}s of "
                  f"{wall:.2f}s wall ({100 * cpu / wall:.0f}%), postgres CPU {pg_cpu:.2f}s, "
                  f"fsync {args.fsync}")
        await bus.close()
        if args.out:
            profiler.dump_stats(args.out)
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
            print(f"\n=== by {order} ===")
            print(text.getvalue().split("\n\n", 1)[-1])
    finally:
        servers.close()


def main() -> None:
    """Parse arguments and profile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
