"""Shared by every benchmark: percentiles, result lines with budgets, and writing the results.

A benchmark returns a :class:`BenchResult` made of :class:`Line`s. A line is one number we care
about (a latency in ms, a throughput in events/s) with its median, its tail (p99 for latencies,
the worst run for throughputs) and, optionally, the budget from ARCHITECTURE.md §8 it is held to.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PASS, FAIL, INFO, ERROR = "pass", "FAIL", "info", "ERROR"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(samples_ns: Sequence[int], *, scale: float = 1e6) -> dict[str, float]:
    """Distribution of durations given in ns, expressed in ``1/scale`` units (default ms)."""
    values = [s / scale for s in samples_ns]
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p99.9": percentile(values, 99.9),
        "max": max(values),
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def throughput_summary(rates: Sequence[float], **raw: Any) -> dict[str, Any]:
    """Several runs of a rate (higher is better): the median and the worst run."""
    return {"n": len(rates), "runs": list(rates), "median": statistics.median(rates),
            "worst": min(rates), "best": max(rates), **raw}


@dataclass(frozen=True)
class Budget:
    """``<stat> <op> <value>``, e.g. median ≤ 0.3 (ms) or median ≥ 20,000 (events/s)."""

    stat: str  # "median" or "tail"
    op: str  # "<=" or ">="
    value: float

    def met_by(self, line: Line) -> bool:
        """Whether the line's chosen statistic is within the budget."""
        measured = line.median if self.stat == "median" else line.tail
        return measured <= self.value if self.op == "<=" else measured >= self.value

    def describe(self, tail_label: str) -> str:
        """Short text for the table, e.g. ``p50 ≤ 0.3``."""
        stat = {"median": "p50" if tail_label == "p99" else "median", "tail": tail_label}
        return f"{stat[self.stat]} {'≤' if self.op == '<=' else '≥'} {self.value:,g}"


@dataclass
class Line:
    """One measured quantity of a benchmark."""

    name: str
    unit: str
    median: float
    tail: float  # p99 (latencies) or the worst run (throughputs)
    tail_label: str = "p99"
    budget: Budget | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def status(self) -> str:
        """pass/FAIL against the budget, or info when the line has none."""
        if self.budget is None:
            return INFO
        return PASS if self.budget.met_by(self) else FAIL


@dataclass
class BenchResult:
    """What one benchmark measured, with how it was set up."""

    name: str
    lines: list[Line] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def status(self) -> str:
        """ERROR if it crashed, FAIL if any budget was missed, else pass."""
        if self.error:
            return ERROR
        return FAIL if any(line.status == FAIL for line in self.lines) else PASS


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):  # counts (e.g. frames lost)
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def machine() -> dict[str, Any]:
    """Where the numbers were taken: they mean little without it."""
    cpu = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def speed_probe(repeats: int = 5) -> float:
    """ms for a fixed pure-Python workload (median of ``repeats``): how fast this CPU is now.

    A VM's CPU can run several times slower on one day than another (a busy host); every
    number taken meanwhile is slower by as much. Each benchmark records the probe taken just
    before it, so runs on different days can be told apart from changes in the code.
    """
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        table: dict[int, str] = {}
        for i in range(100_000):
            table[i & 1023] = str(i)
        times.append(1000 * (time.perf_counter() - began))
    return round(sorted(times)[repeats // 2], 2)


TABLE_HEADER = ("benchmark", "unit", "median", "p99 / worst", "budget", "result")


def table_rows(results: Sequence[BenchResult]) -> list[tuple[str, ...]]:
    """One row per line (or per crashed benchmark)."""
    rows: list[tuple[str, ...]] = []
    for result in results:
        if result.error:
            rows.append((result.name, "-", "-", "-", "-", ERROR))
        for line in result.lines:
            tail = f"{_number(line.tail)} ({line.tail_label})"
            budget = line.budget.describe(line.tail_label) if line.budget else "-"
            rows.append((line.name, line.unit, _number(line.median), tail, budget, line.status))
    return rows


def render_table(results: Sequence[BenchResult]) -> str:
    """A fixed-width text table for the terminal."""
    rows = [TABLE_HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    out = []
    for index, row in enumerate(rows):
        out.append("  ".join(cell.ljust(width) if i in (0, 1, 4, 5) else cell.rjust(width)
                             for i, (cell, width) in enumerate(zip(row, widths, strict=True))))
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def render_markdown(results: Sequence[BenchResult], *, date: str, info: dict[str, Any],
                    quick: bool, total_seconds: float) -> str:
    """``latest.md``: the table, the machine, and each benchmark's setup notes."""
    lines = [
        "# Benchmark results" + (" (quick smoke run)" if quick else ""),
        "",
        f"- date: {date}",
        f"- machine: {info['nproc']} usable CPUs ({info['cpu'] or 'unknown CPU'}), "
        f"Python {info['python']} ({info['implementation']}), {info['platform']}",
        f"- wall time: {total_seconds:.1f} s",
        "- generated by `python bench/run.py" + (" --quick" if quick else "") + "`; budgets "
        "from ARCHITECTURE.md §8",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    for result in results:
        lines += ["", f"## {result.name} ({result.seconds:.1f} s)", ""]
        if result.error:
            lines += ["```", result.error.rstrip(), "```"]
        lines += [f"- {key}: {value}" for key, value in result.config.items()]
        lines += [f"- {note}" for note in result.notes]
        lines += [f"- `{line.name}`: {line.note}" for line in result.lines if line.note]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: Sequence[BenchResult], *, quick: bool,
                  total_seconds: float) -> None:
    """``<out>/<name>.json`` per benchmark and a combined ``<out>/latest.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    for result in results:
        document = {
            "name": result.name,
            "date": date,
            "quick": quick,
            "machine": info,
            "status": result.status,
            "seconds": result.seconds,
            "config": result.config,
            "notes": result.notes,
            "error": result.error,
            "lines": [
                {**asdict(line), "status": line.status,
                 "budget": (None if line.budget is None else
                            {**asdict(line.budget),
                             "text": line.budget.describe(line.tail_label)})}
                for line in result.lines
            ],
        }
        _atomic_write(out_dir / f"{result.name}.json",
                      json.dumps(document, indent=2, default=str, ensure_ascii=False) + "\n")
    _atomic_write(out_dir / "latest.md", render_markdown(
        results, date=date, info=info, quick=quick, total_seconds=total_seconds))


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
