"""The supervisor, supervising tiny Python scripts instead of the real services."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from parley.devkit.infra import pid_alive
from parley.devkit.supervisor import RestartPolicy, Supervisor

FAST_RESTARTS = RestartPolicy(initial_delay=0.2, max_delay=1.0, healthy_after=5.0)
PATIENCE = 15.0  # seconds any awaited event may take before the test fails
STARTED = re.compile(r"(\w+) started \(pid (\d+)\)")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def crashes_twice_then_stays_up(counter: Path) -> list[str]:
    return python(
        "import pathlib, sys, time\n"
        f"counter = pathlib.Path({str(counter)!r})\n"
        "runs = int(counter.read_text()) if counter.exists() else 0\n"
        "counter.write_text(str(runs + 1))\n"
        "if runs < 2:\n"
        "    print('crashing', runs, flush=True)\n"
        "    print('oops on stderr', file=sys.stderr, flush=True)\n"
        "    sys.exit(3)\n"
        "print('up again', flush=True)\n"
        "time.sleep(600)\n")


SLEEPER = python("import time; print('ready', flush=True); time.sleep(600)")
PRINTS_ENV = python("import os, time; print('service', os.environ['PARLEY_SERVICE'],"
                    " os.environ['PARLEY_NATS_URL'], flush=True); time.sleep(600)")


async def wait_for_text(output: io.StringIO, text: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while text not in output.getvalue():
        assert time.monotonic() < deadline, f"{text!r} not in output:\n{output.getvalue()}"
        await asyncio.sleep(0.02)


async def wait_until_dead(pids: Iterable[int]) -> list[int]:
    """The pids still alive after PATIENCE seconds (empty when all died)."""
    deadline = time.monotonic() + PATIENCE
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def kill_leftovers(pids: Iterable[int]) -> None:
    """After a failed test: kill the sleepers it started (checked, in case a pid was reused)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if b"time.sleep(600)" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def test_restart_delay_doubles_up_to_the_maximum_and_resets_after_a_healthy_run() -> None:
    policy = RestartPolicy(initial_delay=0.5, max_delay=30.0, healthy_after=30.0)
    delays = [policy.next_delay(None, uptime=1.0)]
    for _ in range(8):
        delays.append(policy.next_delay(delays[-1], uptime=1.0))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert policy.next_delay(30.0, uptime=31.0) == 0.5


async def test_crashing_child_is_restarted_with_backoff_and_output_is_prefixed(
        tmp_path: Path) -> None:
    output = io.StringIO()
    prepared: list[Mapping[str, str]] = []

    async def prepare(env: Mapping[str, str]) -> None:
        prepared.append(dict(env))

    supervisor = Supervisor(
        {"crasher": crashes_twice_then_stays_up(tmp_path / "runs"), "env": PRINTS_ENV},
        env={"PARLEY_NATS_URL": "nats://example:4222"}, prepare=prepare,
        restart=FAST_RESTARTS, output=output, color=False)
    running = asyncio.create_task(supervisor.run())
    try:
        await wait_for_text(output, "crasher | up again")
        await wait_for_text(output, "env     | service env nats://example:4222")
        pids = supervisor.pids
        assert set(pids) == {"crasher", "env"}
    finally:
        supervisor.stop()
        assert await asyncio.wait_for(running, 20) == 0

    lines = output.getvalue().splitlines()
    assert prepared == [{"PARLEY_NATS_URL": "nats://example:4222"}]
    assert "crasher | crashing 0" in lines and "crasher | crashing 1" in lines
    assert lines.count("crasher | oops on stderr") == 2
    restarts = [line for line in lines if "crasher exited with code 3" in line]
    assert [line.rsplit("restarting in ", 1)[1] for line in restarts] == ["0.2 s", "0.4 s"]
    assert all(line.startswith("parley  | ") for line in restarts)
    assert "parley  | crasher stopped (killed by SIGTERM)" in lines
    assert supervisor.pids == {}
    assert not any(pid_alive(pid) for pid in pids.values())


async def test_child_ignoring_sigterm_is_killed_after_the_stop_timeout() -> None:
    stubborn = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                      " print('ready', flush=True); time.sleep(600)")
    output = io.StringIO()
    supervisor = Supervisor({"stubborn": stubborn}, stop_timeout=0.5, output=output, color=False)
    running = asyncio.create_task(supervisor.run())
    try:
        await wait_for_text(output, "stubborn | ready")
        pid = supervisor.pids["stubborn"]
    finally:
        supervisor.stop()
        assert await asyncio.wait_for(running, 10) == 0
    assert "stubborn still running after 0.5 s; killing it" in output.getvalue()
    assert "stubborn stopped (killed by SIGKILL)" in output.getvalue()
    assert not pid_alive(pid)


async def test_command_that_cannot_start_is_retried(tmp_path: Path) -> None:
    output = io.StringIO()
    supervisor = Supervisor({"missing": [str(tmp_path / "no-such-program")]},
                            restart=FAST_RESTARTS, output=output, color=False)
    running = asyncio.create_task(supervisor.run())
    try:
        await wait_for_text(output, "restarting in 0.4 s")
    finally:
        supervisor.stop()
        assert await asyncio.wait_for(running, 10) == 0
    assert "missing could not start" in output.getvalue()


SUPERVISOR_SCRIPT = f"""
import sys
from parley.devkit.supervisor import Supervisor, serve
sleeper = {SLEEPER!r}
sys.exit(serve(Supervisor({{"alpha": sleeper, "beta": sleeper}}, color=False)))
"""


async def start_supervisor_process() -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """Run a supervisor of two sleepers in its own process; returns it and the children's pids."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISOR_SCRIPT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    pids: dict[str, int] = {}
    ready: set[str] = set()
    while ready != {"alpha", "beta"}:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        assert line, "supervisor exited before its children were ready"
        if started := STARTED.search(line):
            pids[started[1]] = int(started[2])
        if line.endswith("| ready\n"):
            ready.add(line.split("|")[0].strip())
    return process, pids


async def test_sigterm_stops_the_supervisor_and_every_child() -> None:
    process, pids = await start_supervisor_process()
    try:
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, rest.decode()
        assert "alpha stopped" in rest.decode() and "beta stopped" in rest.decode()
        # The supervisor reaped them before exiting: they are gone, not zombies.
        assert not any(pid_alive(pid) for pid in pids.values())
    finally:
        kill_leftovers(pids.values())
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def test_children_die_when_the_supervisor_is_killed() -> None:
    process, pids = await start_supervisor_process()
    try:
        process.kill()
        await asyncio.wait_for(process.communicate(), 10)
        assert await wait_until_dead(pids.values()) == []
    finally:
        kill_leftovers(pids.values())
