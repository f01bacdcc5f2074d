from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from parley.common.runtime import cancel_and_wait, raise_if_cancelled, run_service

SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    from parley.common.runtime import run_service

    async def main(stop: asyncio.Event) -> None:
        print("ready", flush=True)
        await stop.wait()
        print("stopping", flush=True)
        if sys.argv[1] == "slow-drain":
            await asyncio.sleep(60)
        print("drained", flush=True)

    sys.exit(run_service(main))
    """
)


def test_signal_sets_stop_event_and_returns_zero() -> None:
    seen: list[bool] = []

    async def main(stop: asyncio.Event) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=5)
        seen.append(stop.is_set())

    assert run_service(main) == 0
    assert seen == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_main_returning_on_its_own_is_a_clean_stop() -> None:
    async def main(stop: asyncio.Event) -> None:
        assert not stop.is_set()

    assert run_service(main) == 0


def test_exception_from_main_propagates() -> None:
    async def main(stop: asyncio.Event) -> None:
        raise RuntimeError("could not connect")

    with pytest.raises(RuntimeError, match="could not connect"):
        run_service(main)


async def start(tmp_path: Path, mode: str) -> asyncio.subprocess.Process:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), mode, stdout=asyncio.subprocess.PIPE
    )
    assert await read_line(process) == "ready"
    return process


async def read_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    return line.decode().strip()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_first_signal_drains_and_exits_zero(tmp_path: Path, stop_signal: int) -> None:
    process = await start(tmp_path, "quick-drain")
    process.send_signal(stop_signal)
    assert await read_line(process) == "stopping"
    assert await read_line(process) == "drained"
    assert await asyncio.wait_for(process.wait(), timeout=30) == 0


async def test_second_signal_exits_immediately(tmp_path: Path) -> None:
    process = await start(tmp_path, "slow-drain")
    try:
        process.send_signal(signal.SIGTERM)
        assert await read_line(process) == "stopping"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 128 + signal.SIGTERM
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_services_run_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    from parley.common.runtime import run

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    monkeypatch.delenv("PARLEY_EVENT_LOOP", raising=False)
    assert issubclass(run(loop_type()), uvloop.Loop)
    monkeypatch.setenv("PARLEY_EVENT_LOOP", "asyncio")
    assert not issubclass(run(loop_type()), uvloop.Loop)
    monkeypatch.setenv("PARLEY_EVENT_LOOP", "tokio")
    with pytest.raises(ValueError, match="PARLEY_EVENT_LOOP='tokio'"):
        run(loop_type())


async def _stops_slowly() -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)  # cleaning up: the canceller waits meanwhile
        raise


async def test_cancel_and_wait_stops_the_task_and_returns() -> None:
    task = asyncio.create_task(_stops_slowly())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_cancel_and_wait_keeps_the_callers_own_cancellation() -> None:
    went_on = asyncio.Event()

    async def loop_that_stops_a_helper() -> None:
        helper = asyncio.create_task(_stops_slowly())
        await asyncio.sleep(0)
        await cancel_and_wait(helper)
        went_on.set()  # a swallowed cancellation lands here
        await asyncio.sleep(10)

    caller = asyncio.create_task(loop_that_stops_a_helper())
    await asyncio.sleep(0.01)  # the caller waits for the helper to stop
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 1)
    assert not went_on.is_set()


async def test_cancel_and_wait_lets_other_errors_through() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)


NICENESS = textwrap.dedent(
    """
    import os, sys, threading
    from parley.common.service import _set_niceness

    def nice(tid):
        # /proc/self/task/<tid>/stat: field 19 is that thread's nice value
        return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])

    started = threading.Event()
    release = threading.Event()
    running = threading.Thread(target=lambda: (started.set(), release.wait()), daemon=True)
    running.start()
    started.wait()
    try:
        _set_niceness(int(sys.argv[1]))
        later = []
        thread = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
        thread.start()
        thread.join()
        print([nice(threading.get_native_id()), nice(running.native_id)], later)
    finally:
        release.set()
    """
)


def _niceness_run(nice: int, *, unprivileged: bool = False) -> tuple[str, str]:
    import shutil
    import subprocess

    command = [sys.executable, "-c", NICENESS, str(nice)]
    if unprivileged and os.geteuid() == 0:  # root without CAP_SYS_NICE, as a container runs it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux's setpriv is not installed")
        command = [setpriv, "--bounding-set", "-sys_nice", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip(), result.stderr


def test_set_niceness_reaches_every_thread_and_the_ones_started_later() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = min(base + 3, 19)
    out, _ = _niceness_run(nice)
    assert out == f"[{nice}, {nice}] [{nice}]"  # the main thread, the running one, a new one


def test_without_the_privilege_the_service_says_so_and_carries_on() -> None:
    out, err = _niceness_run(-5, unprivileged=True)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert out == f"[{base}, {base}] [{base}]"
    assert f"running at nice {base}, not -5 (PARLEY_NICE)" in err
    assert "CAP_SYS_NICE" in err


async def test_raise_if_cancelled_stops_a_loop_whose_cancel_was_swallowed() -> None:
    """nats-py's flush swallows a CancelledError: a loop that calls it never sees the cancel
    and runs on, holding up whoever awaits it, unless it checks once a round."""
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            raise_if_cancelled()
            rounds += 1
            try:
                await asyncio.sleep(0.01)  # a NATS call...
            except asyncio.CancelledError:
                pass  # ...that swallows the cancel

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert task in done and task.cancelled()
    assert rounds > 1
