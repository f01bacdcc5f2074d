"""Process entry point shared by every service's ``__main__``.

The first SIGTERM or SIGINT sets the stop event; ``main`` is expected to notice, drain (finish
in-flight calls, ``drain()`` the NATS connection) and return. A second signal means the operator
(or the orchestrator's grace period) has lost patience, so the process exits at once.

Processes run on uvloop (libuv; its transports, timers and callbacks are C): the per-message
cost of every socket hop — Twilio frames in the gateway, NATS deliveries in media — is largely
the event loop's, and the audio path makes tens of thousands of them a second. Set
``PARLEY_EVENT_LOOP=asyncio`` for the standard loop (e.g. to use asyncio's debug mode); any other
value is a :class:`~parley.common.config.ConfigError`, which ``serve`` reports like every setting.

A service can ask for a scheduling priority (``PARLEY_NICE``, see :func:`set_niceness`): on a
machine whose cores every process shares, the kernel divides the CPU between runnable threads by
weight, not by need, so the service that needs the most of it waits the most whenever the
others are busy too. Media, whose every inbound frame is due within 20 ms, asks for nice -5.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from .config import ConfigError

__all__ = ["cancel_and_wait", "event_loop_kind", "new_event_loop", "raise_if_cancelled", "run",
           "run_service", "set_niceness"]

log = logging.getLogger(__name__)

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]
T = TypeVar("T")
EVENT_LOOPS = ("uvloop", "asyncio")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has stopped; its other errors propagate.

    Not ``with suppress(CancelledError): await task``: if the caller is itself cancelled while it
    waits, that swallows the caller's cancellation too, and a loop that called it carries on
    (media's speaker could, and a session's close then waited for it forever).
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the caller was cancelled, not (only) the task


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task has been asked to stop.

    For loops that call NATS, once a round: nats-py's flush and ack waits can swallow a
    CancelledError, and a loop that never saw it would run on and hold up whoever awaits it
    (a session's teardown, the gateway's shutdown).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def set_niceness(nice: int) -> None:
    """Give every thread of this process the niceness ``nice`` (-20..19).

    Linux keeps a nice value per thread (``setpriority`` on the process changes only the
    calling thread), so each thread in ``/proc/self/task`` is set; threads started later inherit
    it. Going below the current value needs ``CAP_SYS_NICE`` (or an ``RLIMIT_NICE``): without it
    ``PermissionError`` is raised and nothing has changed.
    """
    if not -20 <= nice <= 19:
        raise ValueError(f"niceness {nice} is outside -20..19")
    try:
        threads = sorted(int(tid) for tid in os.listdir("/proc/self/task"))
    except OSError:
        threads = [0]  # not Linux: the process (or the calling thread) is all we can name
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # that thread has ended since
            continue


def event_loop_kind() -> str:
    """The loop ``PARLEY_EVENT_LOOP`` names (default uvloop); :class:`ConfigError` if unknown."""
    kind = os.environ.get("PARLEY_EVENT_LOOP", "uvloop").strip().lower() or "uvloop"
    if kind not in EVENT_LOOPS:
        raise ConfigError(f"PARLEY_EVENT_LOOP={kind!r}: choose one of {', '.join(EVENT_LOOPS)}")
    return kind


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind ``PARLEY_EVENT_LOOP`` names (default uvloop)."""
    if event_loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the configured event loop."""
    try:
        loop = new_event_loop()
    except Exception:
        coro.close()  # never awaited: say so once, as the error, not as a warning too
        raise
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(coro)


def run_service(
    main: ServiceMain,
    *,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Run ``main(stop_event)`` on a new event loop until it returns; return exit code 0.

    Exceptions from ``main`` propagate (the interpreter then exits with status 1), so both
    ``run_service(main)`` and ``sys.exit(run_service(main))`` behave correctly. A second signal
    while stopping ends the process immediately with status ``128 + signal number``.
    """
    return run(_run(main, signals))


async def _run(main: ServiceMain, signals: Sequence[signal.Signals]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(received: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second %s while stopping; exiting now", received.name)
            _exit_now(128 + received.value)
        log.info("%s received; stopping", received.name)
        stop.set()

    for number in signals:
        loop.add_signal_handler(number, on_signal, number)
    try:
        await main(stop)
    finally:
        for number in signals:
            loop.remove_signal_handler(number)
    log.info("stopped cleanly")
    return 0


def _exit_now(status: int) -> None:
    # os._exit skips cleanup that could hang (that is the point), so flush what we can first.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
