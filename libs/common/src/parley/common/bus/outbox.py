"""Publishing events without holding up the publisher: acks are checked in the background.

A media session publishes ``speech.started`` while handling an audio frame; awaiting the ack
there holds up that call's next frames for a JetStream round trip, and for the whole publish
timeout when the server is slow, after which the frame's remaining work was skipped and the
event lost. An :class:`Outbox` sends at once (the message is in the connection's buffer, in
order behind everything sent before it), and watches the ack instead: one that fails or does not
come within the timeout gets the event published again (the same ``Nats-Msg-Id``, so JetStream
stores it once) with backoff. :meth:`Outbox.drain` waits for everything still unconfirmed, as a
session must before it hands its call over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from nats.js.api import PubAck

from parley.common.events import Event
from parley.common.resilience import retry_policy

from .client import Bus

log = logging.getLogger(__name__)

RECONNECTED_POLL_S = 0.05  # how often an attempt cut off from the server looks for it


class Outbox:
    """Events of one publisher (e.g. a call's media session), acknowledged in the background."""

    def __init__(self, bus: Bus, *, name: str = "", ack_timeout_s: float | None = None,
                 attempts: int = 3) -> None:
        self.bus = bus
        self.name = name
        self._ack_timeout_s = ack_timeout_s  # None: the bus's publish timeout
        self.attempts = attempts
        self.republished = 0  # events published again after a failed or late ack
        self.lost = 0  # events given up after every attempt
        self._unacked: set[asyncio.Future[PubAck]] = set()
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def ack_timeout_s(self) -> float:
        """Seconds an ack may take before the event is published again."""
        return self.bus.publish_timeout if self._ack_timeout_s is None else self._ack_timeout_s

    async def put(self, event: Event) -> None:
        """Send ``event`` now; its ack is awaited in the background.

        If it cannot even be sent (the connection is closed), it is published again in the
        background, as one whose ack failed is: ``put`` does not raise for it.
        """
        try:
            ack = await self.bus.send(event)
        except Exception as exc:
            self._retry(event, exc)
            return
        timer = asyncio.get_running_loop().call_later(self.ack_timeout_s, ack.cancel)
        self._unacked.add(ack)
        ack.add_done_callback(functools.partial(self._on_ack, event, timer))

    @property
    def pending(self) -> int:
        """Events not confirmed yet (awaiting an ack, or being published again)."""
        return len(self._unacked) + len(self._retries)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every event put so far is confirmed or given up (at most ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None
                                  else self.ack_timeout_s * (self.attempts + 1))
        while self._unacked or self._retries:
            left = deadline - loop.time()
            if left <= 0:
                break
            waiting: set[asyncio.Future[Any]] = {*self._unacked, *self._retries}
            await asyncio.wait(waiting, timeout=left)
        for task in list(self._retries):  # out of time: give the rest up
            task.cancel()
        for ack in list(self._unacked):
            ack.cancel()

    def _on_ack(self, event: Event, timer: asyncio.TimerHandle,
                ack: asyncio.Future[PubAck]) -> None:
        timer.cancel()
        self._unacked.discard(ack)
        error: BaseException | None = (TimeoutError(f"no ack in {self.ack_timeout_s:g}s")
                                       if ack.cancelled() else ack.exception())
        if error is None:
            return
        self._retry(event, error)

    def _retry(self, event: Event, error: BaseException) -> None:
        task = asyncio.get_running_loop().create_task(self._again(event, error))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _again(self, event: Event, error: BaseException) -> None:
        log.warning("%s: %s %s not acknowledged (%r); publishing it again", self.name,
                    event.type, event.id, error)
        try:
            async for attempt in retry_policy(attempts=self.attempts, initial=0.1,
                                              maximum=1.0):
                with attempt:
                    await self._reconnected()
                    await self.bus.publish(event)
            self.republished += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.lost += 1
            log.error("%s: %s %s lost after %d attempts: %r", self.name, event.type, event.id,
                      self.attempts + 1, exc)

    async def _reconnected(self) -> None:
        """Wait (up to the ack timeout) for a connection cut off from the server to be back.

        Cut off, the client buffers what is published until its buffer is full, and then
        refuses it at once: the attempts, each meant to last up to the ack timeout, were spent
        in seconds of backoff (a socket full of caller audio lost a mark echo to an 8 s outage).
        A connection closed for good (the service stopping) is waited for no more.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout_s
        # (nats-py has no awaitable for it, only the one reconnected_cb the connection's owner set)
        nc = self.bus.nc
        while not nc.is_connected and not nc.is_closed and (  # noqa: ASYNC110
                loop.time() < deadline):
            await asyncio.sleep(min(RECONNECTED_POLL_S, self.ack_timeout_s))
