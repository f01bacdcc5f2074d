"""The bus client: publish typed events to JetStream, follow a call live, replay its history."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import NotFoundError

from .. import tracing
from ..events import Event, EventDecodeError, decode, encode
from .streams import EVENTS_STREAM, StreamSettings, ensure_streams
from .subjects import call_events, event_subject

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
EventHandler = Callable[[Event], Awaitable[None]]


async def connect(url: str, *, name: str, **options: Any) -> NATS:
    """Connect with endless reconnects (a restarted server is waited for, not fatal)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats disconnected; reconnecting")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    settings: dict[str, Any] = {
        "name": name, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
        "error_cb": on_error, "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    nc = NATS()
    await nc.connect(url, **{**settings, **options})
    return nc


class Bus:
    """One service's connection to NATS and JetStream.

    Own the connection (``await Bus.connect(...)``) or wrap one (``Bus(nc)``); ``close`` drains
    only what it owns.
    """

    def __init__(self, nc: NATS, *, owns_connection: bool = False,
                 publish_timeout: float = 5.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout)
        self._owns = owns_connection
        self._publish_timeout = publish_timeout

    @classmethod
    async def connect(cls, url: str, *, name: str, **options: Any) -> Bus:
        """Connect and own the connection."""
        return cls(await connect(url, name=name, **options), owns_connection=True)

    @property
    def publish_timeout(self) -> float:
        """Seconds a JetStream publish waits for its ack."""
        return self._publish_timeout

    async def ensure_streams(self, settings: StreamSettings | None = None) -> None:
        """Create or update EVENTS, AUDIO, DEADLETTER and the lease bucket."""
        await ensure_streams(self.js, settings or StreamSettings())

    async def close(self) -> None:
        """Drain: finish in-flight deliveries and flush publishes, then disconnect.

        Without a server to drain to (reconnecting, or the drain itself fails) the connection
        is just closed: stopping a service during a NATS outage must still be a clean stop.
        """
        if not self._owns or self.nc.is_closed:
            return
        if self.nc.is_connecting or self.nc.is_reconnecting:
            # What was published meanwhile, buffered for the server, is dropped: closing
            # flushed it into the lost connection, raised ConnectionResetError and skipped the
            # rest of the close (subscriptions, transport). nats-py has no call for it.
            buffered = self.nc._pending_data_size
            self.nc._pending.clear()
            self.nc._pending_data_size = 0
            log.warning("nats unreachable while closing; closed without draining%s",
                        f" ({buffered} bytes published meanwhile not sent)" if buffered else "")
            await self.nc.close()
            return
        try:
            await self.nc.drain()
        except Exception as exc:
            log.warning("nats drain failed (%r); closing without it", exc)
            await self.nc.close()

    async def publish(self, event: Event, *, headers: dict[str, str] | None = None) -> PubAck:
        """Publish to JetStream and await the ack; republishing the same event is a no-op.

        ``Nats-Msg-Id`` is the event id, so JetStream drops duplicates within its window
        (``ack.duplicate`` is then true and ``ack.seq`` is the original's sequence).
        """
        all_headers = tracing.inject_headers(dict(headers or {}))
        all_headers[MSG_ID] = str(event.id)
        return await self.js.publish(event_subject(event), encode(event), headers=all_headers,
                                     timeout=self._publish_timeout)

    async def send(self, event: Event, *,
                   headers: dict[str, str] | None = None) -> asyncio.Future[PubAck]:
        """Publish to JetStream without waiting for the ack; await it later with :meth:`acked`.

        When this returns, the message is in the connection's outgoing buffer behind everything
        sent before it on this connection (``publish`` and ``send`` alike), and the server
        stores one connection's messages in the order it reads them: events sent one after
        another keep their order in the stream while their acks are awaited together. Same
        ``Nats-Msg-Id`` and headers as :meth:`publish`.
        """
        all_headers = tracing.inject_headers(dict(headers or {}))
        all_headers[MSG_ID] = str(event.id)
        return await self.js.publish_async(event_subject(event), encode(event),
                                           headers=all_headers)

    async def acked(self, pending: list[asyncio.Future[PubAck]]) -> list[PubAck]:
        """The acks of events :meth:`send` sent; on timeout the rest are given up (cancelled)."""
        gathered = asyncio.gather(*pending)
        try:
            return await asyncio.wait_for(gathered, self._publish_timeout)
        finally:
            for future in pending:
                future.cancel()  # no-op when done; frees the client's pending-ack slot
            # A caller cancelled mid-wait leaves the gather failed with a CancelledError that
            # nobody reads: read it, or asyncio logs "exception was never retrieved".
            gathered.add_done_callback(_retrieve)

    async def subscribe_call(self, call_id: str, handler: EventHandler, *,
                             org_id: str = "*") -> Subscription:
        """Follow one call live over core NATS (no durability: for reacting, not for work).

        Events that cannot be decoded are logged and skipped; handler errors are logged and do
        not end the subscription.
        """

        async def on_message(msg: Msg) -> None:
            try:
                event = decode(msg.data)
            except EventDecodeError as exc:
                log.error("undecodable event on %s: %s", msg.subject, exc)
                return
            try:
                await handler(event)
            except Exception:
                log.exception("call handler failed on %s", event.type)

        return await self.nc.subscribe(call_events(call_id, org_id), cb=on_message)

    async def replay(self, subject_filter: str, *, start_seq: int = 1,
                     batch: int = 256) -> AsyncIterator[tuple[int, Event]]:
        """Yield ``(stream sequence, event)`` for a filter, oldest first, up to now.

        Uses an ephemeral, ack-less pull consumer, so nothing is left behind on the server. A
        message that is not an event is logged (with its stream sequence) and skipped, so one
        bad message does not stop everything after it from being read. A fetch that gets
        nothing in time while messages are still pending (a reconnect, a busy server, or the
        stream shrinking under ``max_age``) goes on from the last message read, on a new
        consumer, which counts what is really left; three such stalls in a row raise
        :class:`TimeoutError` rather than pass part of the history off as all of it.
        """
        next_seq, stalls = start_seq, 0
        while True:
            config = ConsumerConfig(
                filter_subject=subject_filter, ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=next_seq,
                inactive_threshold=30.0, mem_storage=True,
            )
            sub = await self.js.pull_subscribe(subject_filter, stream=EVENTS_STREAM,
                                               config=config)
            info = await sub.consumer_info()
            try:
                remaining = info.num_pending or 0
                while remaining > 0:
                    try:
                        msgs = await sub.fetch(min(batch, remaining), timeout=2.0)
                    except TimeoutError:
                        break
                    stalls = 0
                    for msg in msgs:
                        remaining = msg.metadata.num_pending
                        next_seq = msg.metadata.sequence.stream + 1
                        try:
                            event = decode(msg.data)
                        except EventDecodeError as exc:
                            log.error("replay of %s: stream seq %d skipped: %s", subject_filter,
                                      msg.metadata.sequence.stream, exc)
                            continue
                        yield msg.metadata.sequence.stream, event
                else:
                    return
            finally:
                await sub.unsubscribe()
                with contextlib.suppress(NotFoundError):  # inactive_threshold would anyway
                    await self.js.delete_consumer(EVENTS_STREAM, info.name)
            stalls += 1
            if stalls == 3:
                raise TimeoutError(f"replay of {subject_filter} stalled at stream seq {next_seq}")
            log.warning("replay of %s: no message in time at stream seq %d; reading on",
                        subject_filter, next_seq)

    async def replay_call(self, call_id: str, *, org_id: str = "*") -> list[Event]:
        """Every recorded event of one call from the stream, in order."""
        return [event async for _, event in self.replay(call_events(call_id, org_id))]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
