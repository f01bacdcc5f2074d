"""Fencing: a call's session publishes only while its lease is surely its own.

An instance frozen past the lease timeout (SIGSTOP, a starved VM) loses its calls to another
instance, and on waking handles what queued up meanwhile (audio frames, key presses, the call's
events) before its next renewal is refused: it published a phantom turn of keys, speech and
transcripts again under new ids, even after ``call.ended``, for a call another instance served.

The lease is surely ours until the lease timeout after the send time of the last renewal the
bucket confirmed (another instance counts the silence from when it saw that write, which is
later). Past that, the session's events are held: released when the next renewal confirms the
lease, dropped if it finds the lease lost. The session's outbound audio is paused meanwhile
(``on_confirmed`` tells it to go on). A session that never held its lease through
:class:`~parley.media.ownership.Leases` (tests that drive one by hand) is never fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from parley.common.events import Event

log = logging.getLogger(__name__)


class Fence:
    """Holds a session's events while its lease is not confirmed; releases or drops them."""

    def __init__(self, publish: Callable[[Event], Awaitable[None]], *, name: str = "",
                 on_dropped: Callable[[int], None] = lambda count: None,
                 on_confirmed: Callable[[], None] = lambda: None) -> None:
        # time.monotonic() up to which the lease is surely ours (set by Leases at each
        # confirmed renewal; -inf once lost)
        self.until = math.inf
        self.name = name
        self._publish = publish
        self._on_dropped = on_dropped
        self._on_confirmed = on_confirmed
        self._held: list[Event] = []
        self._releasing: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._settled.set()
        self.dropped = 0

    def open(self) -> bool:
        """Whether the lease is surely ours now (one clock read)."""
        return time.monotonic() < self.until

    @property
    def lost(self) -> bool:
        """Whether the lease was found lost: nothing is published any more."""
        return self.until == -math.inf

    async def put(self, event: Event) -> None:
        """Publish ``event`` now if the lease is surely ours, else hold it for the verdict."""
        if not self._held and time.monotonic() < self.until:
            await self._publish(event)
        elif self.lost:
            self._drop([event])
        else:  # behind what is held, in order
            self._held.append(event)
            self._settled.clear()

    def confirm(self, until: float) -> None:
        """A renewal confirmed the lease: surely ours until ``until``; what is held goes out."""
        if self.lost:
            return
        self.until = until
        if self._held and self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release())
        self._on_confirmed()

    def drop(self) -> None:
        """The lease is lost: what is held is never published, nor anything after it."""
        self.until = -math.inf
        if self._releasing is not None:
            self._releasing.cancel()
        held, self._held = self._held, []
        self._drop(held)

    async def settle(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the lease's verdict on what is held; drop the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        if self._held:
            log.warning("%s: lease unconfirmed for %.1fs at the end; dropping what was held",
                        self.name, timeout_s)
            self.drop()
        if self._releasing is not None:
            await asyncio.gather(self._releasing, return_exceptions=True)

    async def _release(self) -> None:
        try:
            # Each one stays first until published, so an event put meanwhile goes after it.
            while self._held and time.monotonic() < self.until:
                await self._publish(self._held[0])
                self._held.pop(0)
            if not self._held:
                self._settled.set()
        finally:
            self._releasing = None

    def _drop(self, events: list[Event]) -> None:
        self._settled.set()
        if not events:
            return
        if not self.dropped:
            log.warning("%s: lease lost while unconfirmed; dropping %d held events (%s) and "
                        "any after them", self.name, len(events), events[0].type)
        self.dropped += len(events)
        self._on_dropped(len(events))
