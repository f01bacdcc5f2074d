"""Durable pull consumers: work that must happen exactly once.

The runner fetches from a durable JetStream consumer, decodes each event, calls the handler and
acks only after the handler returns — so the handler must commit its effect (keyed by event id)
before returning. Transient failures are nak'ed with exponential backoff; a message that can never
succeed (undecodable, :class:`PermanentError`, or out of attempts) is copied to the dead-letter
stream with the reason and ``term``-ed, so it never blocks the messages behind it.

By default one message is handled at a time, in stream order. ``concurrency=n`` handles up to
``n`` at once while the runner keeps fetching; with a ``key`` (e.g. the call id), messages with the
same key are still handled one after another in stream order and only different keys run in
parallel. Each message is acked, nak'ed or dead-lettered on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError

from .. import tracing
from ..events import Event, EventDecodeError, decode
from .client import Bus
from .streams import EVENTS_STREAM
from .subjects import dead_letter_subject

log = logging.getLogger(__name__)

MessageHandler = Callable[[Event, Msg], Awaitable[None]]
MessageKey = Callable[[Event], str]


class PermanentError(Exception):
    """Raised by a handler for a message that will never succeed; it is dead-lettered."""


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a durable consumer is declared and paced."""

    durable: str
    filter_subjects: list[str]
    stream: str = EVENTS_STREAM
    max_ack_pending: int = 256
    ack_wait_s: float = 30.0
    max_deliver: int = 8
    batch: int = 32
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    deliver_policy: str = "all"


async def dead_letter(bus: Bus, msg: Msg, *, consumer: str, reason: str) -> None:
    """Keep a copy of ``msg`` on ``parley.dlq.<consumer>`` with why it was given up."""
    meta = msg.metadata
    headers = {
        "Parley-Dlq-Reason": reason[:1000].replace("\r", " ").replace("\n", " "),
        "Parley-Dlq-Subject": msg.subject,
        "Parley-Dlq-Stream": meta.stream,
        "Parley-Dlq-Stream-Seq": str(meta.sequence.stream),
        "Parley-Dlq-Deliveries": str(meta.num_delivered),
        "Nats-Msg-Id": f"{consumer}:{meta.stream}:{meta.sequence.stream}",
    }
    await bus.js.publish(dead_letter_subject(consumer), msg.data, headers=headers)


class DurableConsumer:
    """Runs a handler over a durable pull consumer until stopped."""

    def __init__(self, bus: Bus, settings: ConsumerSettings, handler: MessageHandler, *,
                 on_dead_letter: Callable[[str], None] | None = None, concurrency: int = 1,
                 key: MessageKey | None = None) -> None:
        if not 1 <= concurrency <= settings.max_ack_pending:
            raise ValueError(f"concurrency must be 1..max_ack_pending "
                             f"({settings.max_ack_pending}), not {concurrency}")
        self.bus = bus
        self.settings = settings
        self.handler = handler
        self.concurrency = concurrency
        self._key = key
        self._on_dead_letter = on_dead_letter
        self._task: asyncio.Task[None] | None = None
        self._in_hand: set[asyncio.Task[None]] = set()  # concurrent mode: fetched, not settled
        self._tails: dict[str, asyncio.Task[None]] = {}  # key → its latest message's task
        self._stopping = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0

    def consumer_config(self) -> ConsumerConfig:
        """The JetStream consumer this runner declares."""
        s = self.settings
        return ConsumerConfig(
            durable_name=s.durable, name=s.durable, filter_subjects=s.filter_subjects,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=s.ack_wait_s, max_deliver=s.max_deliver,
            max_ack_pending=s.max_ack_pending, deliver_policy=DeliverPolicy(s.deliver_policy),
        )

    async def start(self) -> None:
        """Declare the consumer (idempotent) and start pulling in a tracked task."""
        await self.bus.js.add_consumer(self.settings.stream, self.consumer_config())
        self._sub = await self.bus.js.pull_subscribe_bind(
            self.settings.durable, stream=self.settings.stream)
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.settings.durable}")

    async def stop(self) -> None:
        """Finish the messages being handled, hand back the rest, stop pulling.

        Messages fetched but not started (the rest of a batch, or ones waiting behind another
        message with the same key) are nak'ed at once rather than left to ``ack_wait``. The
        durable stays on the server.
        """
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _run(self) -> None:
        if self.concurrency > 1:
            await self._run_concurrently()
            return
        while not self._stopping.is_set():
            msgs = await self._fetch(self.settings.batch)
            if msgs is None:
                return
            for index, msg in enumerate(msgs):
                if await self._handed_back(msgs, index):
                    return
                await self._process(msg)

    async def _fetch(self, count: int) -> list[Msg] | None:
        """Up to ``count`` messages (none after a quiet 0.5 s); None once the bus is gone."""
        try:
            return await self._sub.fetch(count, timeout=0.5)
        except (TimeoutError, FetchTimeoutError, NatsTimeoutError):
            return []
        except Exception:
            if self._stopping.is_set() or self.bus.nc.is_closed:
                return None
            log.exception("fetch failed on %s", self.settings.durable)
            await asyncio.sleep(0.5)
            return []

    async def _handed_back(self, msgs: list[Msg], index: int) -> bool:
        """When stopping, hand ``msgs[index:]`` back at once rather than wait out ack_wait."""
        if not self._stopping.is_set():
            return False
        for rest in msgs[index:]:
            await rest.nak()
        return True

    async def _run_concurrently(self) -> None:
        """Fetch while handlers run, at most ``concurrency`` messages in hand."""
        try:
            await self._fetch_and_dispatch()
        except asyncio.CancelledError:
            for task in self._in_hand:
                task.cancel()
            raise
        # Handlers already running finish; messages still waiting behind a key nak themselves.
        while self._in_hand:
            await asyncio.wait(set(self._in_hand))

    async def _fetch_and_dispatch(self) -> None:
        while not self._stopping.is_set():
            room = self.concurrency - len(self._in_hand)
            if room <= 0:
                await asyncio.wait(self._in_hand, timeout=0.5,
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            msgs = await self._fetch(min(self.settings.batch, room))
            if msgs is None:
                return
            for index, msg in enumerate(msgs):
                if await self._handed_back(msgs, index):
                    return
                self._dispatch(msg)

    def _dispatch(self, msg: Msg) -> None:
        try:
            event: Event | EventDecodeError = decode(msg.data)
        except EventDecodeError as exc:
            event = exc
        key = self._key(event) if self._key is not None and not isinstance(
            event, EventDecodeError) else None
        before = self._tails.get(key) if key is not None else None
        task = asyncio.create_task(self._after(before, msg, event),
                                   name=f"consumer:{self.settings.durable}:{key or ''}")
        self._in_hand.add(task)
        if key is not None:
            self._tails[key] = task

        def settled(done: asyncio.Task[None]) -> None:
            self._in_hand.discard(done)
            if key is not None and self._tails.get(key) is done:
                del self._tails[key]
            if not done.cancelled() and done.exception() is not None:
                log.error("%s: handling failed outside the handler", self.settings.durable,
                          exc_info=done.exception())

        task.add_done_callback(settled)

    async def _after(self, before: asyncio.Task[None] | None, msg: Msg,
                     event: Event | EventDecodeError) -> None:
        """Handle ``msg`` once the message with the same key before it is settled."""
        if before is not None:
            while not before.done():
                await asyncio.wait({before}, timeout=self.settings.ack_wait_s / 3)
                if not before.done():
                    await msg.in_progress()  # still ours: it waits its turn, not forgotten
            if self._stopping.is_set():
                await msg.nak()  # not started: hand it back at once
                return
        await self._process(msg, event)

    async def _process(self, msg: Msg, event: Event | EventDecodeError | None = None) -> None:
        durable = self.settings.durable
        if event is None:
            try:
                event = decode(msg.data)
            except EventDecodeError as exc:
                event = exc
        if isinstance(event, EventDecodeError):
            await self._give_up(msg, f"undecodable: {event}")
            return
        context = tracing.extract_context(msg.headers)
        try:
            with tracing.tracer("parley.bus").start_as_current_span(
                    f"{durable} {event.type}", context=context):
                await self.handler(event, msg)
        except PermanentError as exc:
            await self._give_up(msg, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            attempts = msg.metadata.num_delivered
            if attempts >= self.settings.max_deliver:
                await self._give_up(msg, f"failed {attempts} times, last: "
                                         f"{type(exc).__name__}: {exc}")
                return
            delay = min(self.settings.backoff_initial_s * 2 ** (attempts - 1),
                        self.settings.backoff_max_s)
            log.warning("%s: %s on %s (attempt %d), retry in %.2fs", durable,
                        type(exc).__name__, event.type, attempts, delay, exc_info=True)
            await msg.nak(delay=delay)
            return
        await msg.ack()
        self.processed += 1

    async def _give_up(self, msg: Msg, reason: str) -> None:
        log.error("%s: dead-lettering stream seq %d: %s", self.settings.durable,
                  msg.metadata.sequence.stream, reason)
        await dead_letter(self.bus, msg, consumer=self.settings.durable, reason=reason)
        await msg.term()
        self.dead_lettered += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(reason)
