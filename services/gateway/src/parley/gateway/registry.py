"""The live calls and sockets one gateway instance holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Coroutine
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger(__name__)

# At shutdown, how long the calls whose socket died get to be hung up (a REST call: a second or
# so) before the clients they need are closed. Inside the 30 s an orchestrator usually allows
# a stopping process, after the 10 s the server gives requests in flight.
SETTLE_AT_SHUTDOWN_S = 5.0
# The whole stop, from closing the carrier sockets to the audit's last flush: within an
# orchestrator's kill grace (30 s), leaving time to close the pool and the bus and exit. Each
# bounded wait after the server's (its sockets, its requests in flight) gets at most what is
# left of it (app.py): run one after the other at their own bounds, they could take longer.
STOP_WITHIN_S = 25.0


class LiveCall(Protocol):
    """A session that owns a call's telephony socket on this instance."""

    call_id: str

    async def replace(self) -> None:
        """Another socket took the call over; let go of it."""


class CallRegistry:
    """The live calls, their sockets, and the calls whose socket died.

    Which call each live session owns; every open socket (closed on shutdown); the calls whose
    socket died, waiting for the carrier to reconnect (decided on shutdown).
    """

    def __init__(self) -> None:
        self.sockets: set[web.WebSocketResponse] = set()
        self.calls: dict[str, LiveCall] = {}
        self.stopping = asyncio.Event()  # the gateway is shutting down: wait for nothing
        self.settling: set[asyncio.Task[None]] = set()
        self._stop_by: float | None = None  # the loop time the stop is to be done by

    def begin_stop(self, within_s: float = STOP_WITHIN_S) -> None:
        """The gateway is stopping: wait for nothing, and be done within ``within_s``."""
        self.stopping.set()
        if self._stop_by is None:
            self._stop_by = asyncio.get_running_loop().time() + within_s

    def stop_left(self) -> float:
        """Seconds left of the stop's budget (unbounded if the stop has not begun)."""
        if self._stop_by is None:
            return math.inf
        return max(0.0, self._stop_by - asyncio.get_running_loop().time())

    def settle(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run what decides a call whose socket died, as a task the app's shutdown awaits.

        Not its socket handler's: the server cancels that at shutdown, or forgets it when the
        connection is lost, and the call would stay live at the carrier, billed.
        """
        task = asyncio.create_task(coro, name=name)
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)
        return task

    async def settle_all(self, timeout_s: float = SETTLE_AT_SHUTDOWN_S) -> None:
        """At shutdown: end the reconnect waits and let their calls be decided, bounded."""
        self.stopping.set()
        if not self.settling:
            return
        _, pending = await asyncio.wait(set(self.settling), timeout=timeout_s)
        if not pending:
            return
        log.error("%d calls whose socket died not hung up within %gs of shutdown: they may "
                  "stay live at the carrier", len(pending), timeout_s)
        for task in pending:
            task.cancel()
        # A NATS call may swallow the cancellation (nats-py's flush does): wait only briefly.
        await asyncio.wait(pending, timeout=1.0)

    def claim(self, call: LiveCall) -> LiveCall | None:
        """Make ``call`` the owner of its call id; returns the session it displaced."""
        previous = self.calls.get(call.call_id)
        self.calls[call.call_id] = call
        return previous if previous is not call else None

    def release(self, call: LiveCall) -> None:
        """Forget ``call`` if it still owns its call id."""
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]

    async def close_all(self, code: int, message: bytes) -> None:
        """Close every open socket with ``code`` (GOING_AWAY on shutdown)."""
        sockets = list(self.sockets)
        if sockets:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(ws.close(code=code, message=message) for ws in sockets),
                                     return_exceptions=True)
