"""The live calls and sockets one gateway instance holds."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from aiohttp import web


class LiveCall(Protocol):
    """A session that owns a call's telephony socket on this instance."""

    call_id: str

    async def replace(self) -> None:
        """Another socket took the call over; let go of it."""


class CallRegistry:
    """Which call each live session owns, and every open socket (closed on shutdown)."""

    def __init__(self) -> None:
        self.sockets: set[web.WebSocketResponse] = set()
        self.calls: dict[str, LiveCall] = {}

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
