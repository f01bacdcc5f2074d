"""The process supervisor behind ``parley up``: one child process per service, kept running.

Every line a child writes (stdout and stderr) is printed with an aligned ``name |`` prefix, coloured
when the output is a terminal. A child that exits on its own is restarted after a back-off that
doubles from 0.5 s to 30 s and starts over once the child has stayed up for 30 s. On stop, every
child gets SIGTERM, stragglers get SIGKILL after 10 s, and all are reaped before
:meth:`Supervisor.run` returns.

Children must also die when the supervisor itself is killed (SIGKILL, the OOM killer) and has no
chance to stop them. Keeping them in the supervisor's process group would not achieve that, since
nobody signals the group then; so on Linux each child asks the kernel, between fork and exec, for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``). SIGKILL because this is the last resort;
orderly shutdown is the supervisor's job. The kernel ties that signal to the *thread* that forked
the child, and asyncio forks from the event loop's thread, so run the loop in a thread that lives as
long as the supervisor (``serve`` uses the main thread). Each child gets its own session and process
group: Ctrl-C in the terminal then reaches only the supervisor, which stops the children in order,
and a stop signal reaches the child's own subprocesses too. Other systems have no parent-death
signal; there the children of a killed supervisor keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

PrepareHook = Callable[[Mapping[str, str]], Awaitable[None]]

SUPERVISOR_NAME = "parley"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)  # ANSI foreground colours, one per child
_READ_SIZE = 65536


@dataclass(frozen=True)
class RestartPolicy:
    """How long to wait before restarting a child that exited on its own."""

    initial_delay: float = 0.5
    max_delay: float = 30.0
    healthy_after: float = 30.0  # a child up this long is healthy again: back to initial_delay

    def next_delay(self, previous_delay: float | None, uptime: float) -> float:
        """The delay before the next restart, given the previous delay and the last uptime."""
        if previous_delay is None or uptime >= self.healthy_after:
            return self.initial_delay
        return min(previous_delay * 2, self.max_delay)


class Supervisor:
    """Runs each command as a child process until stopped, restarting those that exit.

    ``commands`` maps a service name to its argv. ``env`` is added to this process' environment
    for every child, together with ``PARLEY_SERVICE=<name>`` and ``PYTHONUNBUFFERED=1``.
    ``prepare(env)``, when given, is awaited once before any child starts (migrations, streams).
    """

    def __init__(self, commands: Mapping[str, Sequence[str]], *,
                 env: Mapping[str, str] | None = None, prepare: PrepareHook | None = None,
                 restart: RestartPolicy | None = None, stop_timeout: float = 10.0,
                 output: TextIO | None = None, color: bool | None = None) -> None:
        if not commands:
            raise ValueError("nothing to supervise: no commands")
        self.commands = {name: list(argv) for name, argv in commands.items()}
        self.env = dict(env or {})
        self._prepare = prepare
        self._restart = restart or RestartPolicy()
        self._stop_timeout = stop_timeout
        self._output = output or sys.stdout
        if color is None:
            color = self._output.isatty() and "NO_COLOR" not in os.environ
        self._prefixes = _prefixes([SUPERVISOR_NAME, *self.commands], color=color)
        self._stop_requested = asyncio.Event()
        self._kill_requested = asyncio.Event()
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._preexec: Callable[[], None] | None = None

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each child currently running, by service name."""
        return {name: process.pid for name, process in self._processes.items()}

    def stop(self) -> None:
        """Ask every child to stop; asking a second time kills them without waiting."""
        if self._stop_requested.is_set():
            self._say("stopping now (SIGKILL)")
            self._kill_requested.set()
        else:
            self._say(f"stopping all (up to {self._stop_timeout:g} s; once more to kill)")
        self._stop_requested.set()

    async def run(self) -> int:
        """Prepare, then supervise every command until :meth:`stop`; 0 once all are reaped."""
        self._preexec = parent_death_hook()
        if self._prepare is not None:
            await self._prepare(self.env)
        tasks = [asyncio.create_task(self._supervise(name, argv), name=f"supervise {name}")
                 for name, argv in self.commands.items()]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # only left running when run() itself is cancelled or failed
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return 0

    async def _supervise(self, name: str, argv: list[str]) -> None:
        delay: float | None = None
        while not self._stop_requested.is_set():
            started_at = time.monotonic()
            returncode = await self._run_once(name, argv)
            if self._stop_requested.is_set():
                self._say(f"{name} stopped ({_describe_exit(returncode)})")
                return
            uptime = time.monotonic() - started_at
            delay = self._restart.next_delay(delay, uptime)
            self._say(f"{name} {_describe_exit(returncode)} after {uptime:.1f} s;"
                      f" restarting in {delay:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _run_once(self, name: str, argv: list[str]) -> int | None:
        """Run the command once, until it exits or is stopped; its return code (None: no start)."""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self._child_env(name),
                start_new_session=True, preexec_fn=self._preexec)
        except OSError as error:
            self._say(f"{name} could not start: {error}")
            return None
        self._processes[name] = process
        self._say(f"{name} started (pid {process.pid})")
        assert process.stdout is not None
        copying = asyncio.create_task(self._copy_output(name, process.stdout))
        exited = asyncio.create_task(process.wait())
        stopping = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(name, process, exited)
        finally:
            stopping.cancel()
            if not exited.done():  # cancelled: never leave the child behind
                _signal_group(process, signal.SIGKILL)
            await exited
            await copying
            del self._processes[name]
        return process.returncode

    async def _terminate(self, name: str, process: asyncio.subprocess.Process,
                         exited: asyncio.Task[int]) -> None:
        _signal_group(process, signal.SIGTERM)
        killing = asyncio.create_task(self._kill_requested.wait())
        try:
            await asyncio.wait({exited, killing}, timeout=self._stop_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            killing.cancel()
        if not exited.done():
            if not self._kill_requested.is_set():
                self._say(f"{name} still running after {self._stop_timeout:g} s; killing it")
            _signal_group(process, signal.SIGKILL)

    async def _copy_output(self, name: str, stream: asyncio.StreamReader) -> None:
        # Fixed-size reads rather than readline(): a huge line must not stop the copying.
        pending = b""
        while chunk := await stream.read(_READ_SIZE):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._write(name, line.decode(errors="replace").rstrip("\r"))
        if pending:
            self._write(name, pending.decode(errors="replace"))

    def _child_env(self, name: str) -> dict[str, str]:
        return {**os.environ, **self.env, "PARLEY_SERVICE": name, "PYTHONUNBUFFERED": "1"}

    def _say(self, message: str) -> None:
        self._write(SUPERVISOR_NAME, message)

    def _write(self, name: str, text: str) -> None:
        self._output.write(f"{self._prefixes[name]}{text}\n")
        self._output.flush()


def serve(supervisor: Supervisor) -> int:
    """Run the supervisor on a new event loop until SIGINT, SIGTERM or SIGHUP stops it."""

    async def supervise_until_signalled() -> int:
        loop = asyncio.get_running_loop()
        stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for stop_signal in stop_signals:
            loop.add_signal_handler(stop_signal, supervisor.stop)
        try:
            return await supervisor.run()
        finally:
            for stop_signal in stop_signals:
                loop.remove_signal_handler(stop_signal)

    return asyncio.run(supervise_until_signalled())


def parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved now: between fork and exec only the already-loaded function may be called.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    kill_signal = int(signal.SIGKILL)
    parent_pid = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, kill_signal, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return die_with_parent


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    # The child leads its own process group (start_new_session), so this reaches its subprocesses.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "failed to start"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _prefixes(names: Sequence[str], *, color: bool) -> dict[str, str]:
    width = max(len(name) for name in names)
    if not color:
        return {name: f"{name:<{width}} | " for name in names}
    children = [name for name in names if name != SUPERVISOR_NAME]
    prefixes = {name: f"\x1b[{colour}m{name:<{width}} |\x1b[0m "
                for name, colour in zip(children, itertools.cycle(_COLOURS), strict=False)}
    prefixes[SUPERVISOR_NAME] = f"\x1b[1m{SUPERVISOR_NAME:<{width}} |\x1b[0m "  # bold, no colour
    return prefixes
