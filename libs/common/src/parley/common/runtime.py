"""Process entry point shared by every service's ``__main__``.

The first SIGTERM or SIGINT sets the stop event; ``main`` is expected to notice, drain (finish
in-flight calls, ``drain()`` the NATS connection) and return. A second signal means the operator
(or the orchestrator's grace period) has lost patience, so the process exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

__all__ = ["run_service"]

log = logging.getLogger(__name__)

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]


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
    return asyncio.run(_run(main, signals))


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
