"""Publishing events without holding up the publisher: acks are checked in the background.

A media session publishes ``speech.started`` while handling an audio frame; awaiting the ack
there holds up that call's next frames for a JetStream round trip, and for the whole publish
timeout when the server is slow, after which the frame's remaining work was skipped and the
event lost. An :class:`Outbox` sends at once (the message is in the connection's buffer, in
order behind everything sent before it), and watches the ack instead: one that fails or does not
come within the timeout gets the event published again (the same ``Nats-Msg-Id``, so JetStream
stores it once) with backoff. :meth:`Outbox.drain` waits for everything still unconfirmed, as a
session must before it hands its call over (or a service before it stops).

An event published again is stored after whatever was sent while its ack was awaited: an
event that must come after all the others (a call's end) goes through
:meth:`Outbox.put_after_pending`, which sends it once they are confirmed or given up.
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
        self.dropped = 0  # events given up unconfirmed when a drain ran out of time
        # What is not confirmed yet, each with the ordinal of its put: a put still sending, an
        # ack awaited, an event being published again (the ordinal of the put it came from)
        self._put = 0
        self._sending: dict[asyncio.Future[None], int] = {}
        self._unacked: dict[asyncio.Future[PubAck], int] = {}
        self._retries: dict[asyncio.Task[Any], int] = {}

    @property
    def ack_timeout_s(self) -> float:
        """Seconds an ack may take before the event is published again."""
        return self.bus.publish_timeout if self._ack_timeout_s is None else self._ack_timeout_s

    async def put(self, event: Event) -> None:
        """Send ``event`` now; its ack is awaited in the background.

        If it cannot even be sent (the connection is closed), it is published again in the
        background, as one whose ack failed is: ``put`` does not raise for it.
        """
        loop = asyncio.get_running_loop()
        self._put += 1
        ordinal = self._put
        sending: asyncio.Future[None] = loop.create_future()
        self._sending[sending] = ordinal
        try:
            ack = await self.bus.send(event)
        except Exception as exc:
            self._retry(event, exc, ordinal)
            return
        else:
            timer = loop.call_later(self.ack_timeout_s, ack.cancel)
            self._unacked[ack] = ordinal
            ack.add_done_callback(functools.partial(self._on_ack, event, timer, ordinal))
        finally:
            del self._sending[sending]
            sending.set_result(None)

    def put_after_pending(self, *events: Event) -> asyncio.Task[bool]:
        """Publish ``events``, in order, once every event put so far is confirmed or given up.

        An event published again is stored after whatever was sent while its ack was awaited;
        these are published only then, each awaiting its ack (with the attempts of an event
        put), so none is stored before an earlier one. The task (pending, and drained, like
        the rest) is True if every one of ``events`` was confirmed.
        """
        self._put += 1
        task = asyncio.get_running_loop().create_task(self._after(self._put, events))
        self._retries[task] = self._put
        task.add_done_callback(self._forget_retry)
        return task

    @property
    def pending(self) -> int:
        """Events not confirmed yet (being sent, awaiting an ack, or being published again)."""
        return len(self._sending) + len(self._unacked) + len(self._retries)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Wait until every event put so far is confirmed or given up (at most ``timeout_s``).

        What is still unconfirmed then is given up (counted in ``dropped``), at once if the
        connection is closed for good: nothing will take it. Returns how many were dropped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None
                                  else self.ack_timeout_s * (self.attempts + 1))
        while self.pending and not self.bus.nc.is_closed:
            left = deadline - loop.time()
            if left <= 0:
                break
            # (woken now and then: the connection may have been closed meanwhile)
            await asyncio.wait(self._waiting(), timeout=min(left, 1.0))
        dropped_before = self.dropped
        acks, self._unacked = self._unacked, {}  # given up: not published again
        self.dropped += len(acks)
        for ack in acks:
            ack.cancel()
        retries = list(self._retries)
        for task in retries:  # each counts the events it gives up
            task.cancel()
        if retries:
            await asyncio.wait(retries)
        return self.dropped - dropped_before

    def _waiting(self, before: int | None = None) -> set[asyncio.Future[Any]]:
        """What is unconfirmed (of the puts before ordinal ``before``, if given)."""
        return {future for items in (self._sending, self._unacked, self._retries)
                for future, ordinal in items.items() if before is None or ordinal < before}

    def _on_ack(self, event: Event, timer: asyncio.TimerHandle, ordinal: int,
                ack: asyncio.Future[PubAck]) -> None:
        timer.cancel()
        if self._unacked.pop(ack, None) is None:
            return  # given up by a drain
        error: BaseException | None = (TimeoutError(f"no ack in {self.ack_timeout_s:g}s")
                                       if ack.cancelled() else ack.exception())
        if error is None:
            return
        self._retry(event, error, ordinal)

    def _retry(self, event: Event, error: BaseException, ordinal: int) -> None:
        task = asyncio.get_running_loop().create_task(self._again(event, error))
        self._retries[task] = ordinal
        task.add_done_callback(self._forget_retry)

    def _forget_retry(self, task: asyncio.Task[Any]) -> None:
        self._retries.pop(task, None)

    async def _again(self, event: Event, error: BaseException) -> None:
        log.warning("%s: %s %s not acknowledged (%r); publishing it again", self.name,
                    event.type, event.id, error)
        try:
            if await self._publish(event, attempts=self.attempts, tried=1):
                self.republished += 1
        except asyncio.CancelledError:
            self.dropped += 1
            raise

    async def _after(self, ordinal: int, events: tuple[Event, ...]) -> bool:
        left = len(events)
        try:
            # An ack that fails is followed by its event's retry (a task started by the ack's
            # callback, before this wakes): wait again until none of the earlier puts is left.
            while earlier := self._waiting(before=ordinal):
                await asyncio.wait(earlier)
            confirmed = True
            for event in events:
                confirmed = await self._publish(event, attempts=self.attempts + 1) and confirmed
                left -= 1
            return confirmed
        except asyncio.CancelledError:
            self.dropped += left
            raise

    async def _publish(self, event: Event, *, attempts: int, tried: int = 0) -> bool:
        """Publish awaiting the ack, up to ``attempts`` times; False if lost (logged)."""
        try:
            async for attempt in retry_policy(attempts=attempts, initial=0.1, maximum=1.0):
                with attempt:
                    await self._reconnected()
                    await self.bus.publish(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.lost += 1
            log.error("%s: %s %s lost after %d attempts: %r", self.name, event.type, event.id,
                      tried + attempts, exc)
            return False
        return True

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
