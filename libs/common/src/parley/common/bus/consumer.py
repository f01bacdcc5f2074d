"""Durable pull consumers: work that must happen exactly once.

The runner pulls from a durable JetStream consumer, decodes each event, calls the handler and
acks only after the handler returns — so the handler must commit its effect (keyed by event id)
before returning. Transient failures are nak'ed with exponential backoff; a message that can never
succeed (undecodable, :class:`PermanentError`, or out of attempts) is copied to the dead-letter
stream with the reason and ``term``-ed, so it never blocks the messages behind it. Attempts run out
however they were used: a delivery past ``max_deliver`` (the earlier ones crashed the process,
overran ``ack_wait`` or were handed back) is dead-lettered without calling the handler. If the dead
letter cannot be stored, the message is nak'ed (``backoff_max_s``) and given up again later. No
single message ends the runner: a failure outside the handler (an ack lost in a NATS blip) is
logged, and the message comes back after ``ack_wait``.

By default one message is handled at a time, in stream order. ``concurrency=n`` handles up to
``n`` at once while the runner keeps pulling; with a ``key`` (e.g. the call id), messages with the
same key are still handled one after another in stream order and only different keys run in
parallel. Each message is acked, nak'ed or dead-lettered on its own. A message that arrived and
waits its turn (pulled ahead, or behind its key) is kept alive with ``in_progress`` every
``ack_wait``/3, so the server does not deliver it again while it waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig, DeliverPolicy, Header

from .. import tracing
from ..events import Event, EventDecodeError, decode
from .client import Bus
from .streams import EVENTS_STREAM
from .subjects import dead_letter_subject

log = logging.getLogger(__name__)

PULL_EXPIRES_S = 5.0  # how long a pull request waits on the server for messages
PULL_GRACE_S = 1.0  # a request whose end never arrived is forgotten this long after it expired
PULL_RETRY_S = 1.0  # after the server refused a pull request, ask again this much later

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
    max_deliver: int = 8  # deliveries the handler gets; the runner dead-letters the next one
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
    """Runs a handler over a durable pull consumer until stopped.

    Messages are pulled continuously rather than fetched batch by batch: pull requests stay
    outstanding on the server (each for up to ``PULL_EXPIRES_S``), topped up as messages are
    settled, so a message is pushed to the handler the moment it is stored. (nats-py's
    ``fetch(n)`` can hold the first message until the batch fills or its timeout passes: up to
    half a second at a quiet moment.) At most ``batch`` messages (one at a time) or
    ``concurrency`` messages (concurrent) are in hand or requested at once.
    """

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
        self._sub: Subscription | None = None
        # Pull requests outstanding on the server, oldest first: [local deadline, still owed].
        self._requests: collections.deque[list[float]] = collections.deque()
        self._buffer: collections.deque[Msg] = collections.deque()  # one-at-a-time: arrived
        self._busy = False  # one-at-a-time: a message is being handled
        self._in_hand: set[asyncio.Task[None]] = set()  # concurrent mode: arrived, not settled
        self._tails: dict[str, asyncio.Task[None]] = {}  # key → its latest message's task
        self._changed = asyncio.Event()  # room to pull more, or a message to handle
        self._problem = ""  # why the server last refused a pull request, until one works
        self._pause_until = 0.0  # no pull requests before then (after a refusal)
        self._stopping = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0

    def consumer_config(self) -> ConsumerConfig:
        """The JetStream consumer this runner declares."""
        s = self.settings
        # No limit on the server: one that stops delivering drops the message without a dead
        # letter. The runner counts deliveries itself, so a message leaves only acked, or
        # term-ed once its dead letter is stored. (An existing durable is updated in place.)
        return ConsumerConfig(
            durable_name=s.durable, name=s.durable, filter_subjects=s.filter_subjects,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=s.ack_wait_s, max_deliver=-1,
            max_ack_pending=s.max_ack_pending, deliver_policy=DeliverPolicy(s.deliver_policy),
        )

    async def start(self) -> None:
        """Declare the consumer (idempotent) and start pulling in a tracked task."""
        await self.bus.js.add_consumer(self.settings.stream, self.consumer_config())
        self._next = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.settings.stream}." \
                     f"{self.settings.durable}"
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(self._inbox, cb=self._arrived)
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.settings.durable}")

    async def stop(self) -> None:
        """Finish the messages being handled, hand back the rest, stop pulling.

        Messages that arrived but were not started (waiting in the buffer, or behind another
        message with the same key) are nak'ed at once rather than left to ``ack_wait``. The
        durable stays on the server.
        """
        self._stopping.set()
        self._changed.set()
        if self._sub is not None:  # no more deliveries: the server drops requests without interest
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._buffer:
            with contextlib.suppress(Exception):
                await self._buffer.popleft().nak()

    # ------------------------------------------------------------------ pulling

    @property
    def _owed(self) -> int:
        """Messages requested from the server and not delivered yet."""
        return int(sum(owed for _, owed in self._requests))

    def _room(self) -> int:
        """How many more messages may be requested now."""
        if self.concurrency > 1:
            held = len(self._in_hand)
            limit = self.concurrency
        else:
            held = len(self._buffer) + self._busy
            limit = self.settings.batch
        return limit - held - self._owed

    async def _pull(self) -> None:
        """Keep pull requests outstanding while there is room for their messages."""
        limit = self.concurrency if self.concurrency > 1 else self.settings.batch
        threshold = max(1, min(limit, self.settings.batch) // 2)
        reconnects = self.bus.nc.stats["reconnects"]
        while not self._stopping.is_set():
            now = time.monotonic()
            if self.bus.nc.stats["reconnects"] != reconnects:
                # A restarted server has forgotten our requests: ask afresh, now. (A server
                # that survived ends the old ones later; each such end is taken for one of the
                # new requests, which only means asking again a little early.)
                reconnects = self.bus.nc.stats["reconnects"]
                self._requests.clear()
            while self._requests and self._requests[0][0] < now:
                self._requests.popleft()  # its end never came: stop counting it
            room = self._room()
            if now < self._pause_until:
                room = 0
            if room > 0 and (not self._requests or room >= threshold):
                count = min(room, self.settings.batch)
                request = json.dumps({"batch": count,
                                      "expires": int(PULL_EXPIRES_S * 1e9)}).encode()
                self._requests.append([now + PULL_EXPIRES_S + PULL_GRACE_S, count])
                try:
                    await self.bus.nc.publish(self._next, request, reply=self._inbox)
                except Exception:
                    self._requests.pop()
                    if self._stopping.is_set() or self.bus.nc.is_closed:
                        return
                    log.exception("pull request failed on %s", self.settings.durable)
                    await asyncio.sleep(0.5)
                continue
            self._changed.clear()
            wait = self._requests[0][0] - now if self._requests else PULL_EXPIRES_S
            if now < self._pause_until:
                wait = min(wait, self._pause_until - now)
            with contextlib.suppress(TimeoutError):  # at least every second: a reconnect?
                await asyncio.wait_for(self._changed.wait(), timeout=min(max(wait, 0.01), 1.0))

    async def _arrived(self, msg: Msg) -> None:
        """A message (or a request's end) delivered to the inbox."""
        status = msg.headers.get(Header.STATUS) if msg.headers else None
        if status is not None:
            self._request_ended(msg, status)
            return
        if self._requests:
            self._requests[0][1] -= 1
            if self._requests[0][1] <= 0:
                self._requests.popleft()
        if self._problem:
            log.info("%s: pulling again", self.settings.durable)
            self._problem = ""
        if self._stopping.is_set():
            await msg.nak()  # not started: hand it back at once
            return
        if self.concurrency > 1:
            self._dispatch(msg)
        else:
            self._buffer.append(msg)
            self._changed.set()

    def _request_ended(self, msg: Msg, status: str) -> None:
        if status == "100":  # an idle heartbeat (none are asked for)
            return
        if self._requests:  # requests end in the order they were made
            self._requests.popleft()
        if status != "408":  # 408: a request that ran its course; anything else is trouble
            # e.g. 409 Consumer Deleted, 503 no responders (no such consumer): say so once,
            # and ask again only after a pause, not in a tight loop.
            description = ((msg.headers or {}).get(Header.DESCRIPTION) or "").strip().splitlines()
            problem = f"{status} {description[0] if description else ''}".strip()
            if status == "503":
                problem = "503 no responders: the consumer does not exist"
            if problem != self._problem:
                log.error("%s: pull request refused: %s", self.settings.durable, problem)
                self._problem = problem
            self._pause_until = time.monotonic() + PULL_RETRY_S
        elif self._problem:
            log.info("%s: pulling again", self.settings.durable)
            self._problem = ""
        self._changed.set()

    # ------------------------------------------------------------------ handling

    @property
    def _keep_alive_s(self) -> float:
        """How often a message waiting its turn tells the server it is still ours."""
        return self.settings.ack_wait_s / 3

    async def _run(self) -> None:
        if self.concurrency > 1:
            await self._run_concurrently()
            return
        puller = asyncio.create_task(self._pull())
        keeper = asyncio.create_task(self._keep_buffer_alive())
        try:
            while True:
                while not self._buffer:
                    if self._stopping.is_set():
                        return
                    self._changed.clear()
                    await self._changed.wait()
                    self._changed.set()  # the puller may be waiting on the same change
                if self._stopping.is_set():
                    return  # stop() hands the buffer back
                self._busy = True
                msg = self._buffer.popleft()
                try:
                    await self._process(msg)
                except Exception:  # e.g. the ack lost in a NATS blip: one message never ends us
                    log.exception("%s: handling stream seq %d failed outside the handler; "
                                  "it comes back after ack_wait", self.settings.durable,
                                  msg.metadata.sequence.stream)
                finally:
                    self._busy = False
                    self._changed.set()
        finally:
            for task in (puller, keeper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _keep_buffer_alive(self) -> None:
        """Tell the server now and then that the messages waiting in the buffer are still ours.

        Up to ``batch`` messages wait behind the one being handled; past ``ack_wait`` the server
        would deliver them again while they are still queued here, to be handled twice.
        """
        while True:
            await asyncio.sleep(self._keep_alive_s)
            try:
                for msg in list(self._buffer):
                    await msg.in_progress()
            except Exception:
                log.warning("%s: could not keep the waiting messages alive",
                            self.settings.durable, exc_info=True)

    async def _run_concurrently(self) -> None:
        """Pull while handlers run, at most ``concurrency`` messages in hand or requested."""
        try:
            await self._pull()
        except asyncio.CancelledError:
            for task in self._in_hand:
                task.cancel()
            raise
        # Handlers already running finish; messages still waiting behind a key nak themselves.
        while self._in_hand:
            await asyncio.wait(set(self._in_hand))

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
            self._changed.set()  # room for one more
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
                await asyncio.wait({before}, timeout=self._keep_alive_s)
                if not before.done():
                    await msg.in_progress()  # still ours: it waits its turn, not forgotten
            if self._stopping.is_set():
                await msg.nak()  # not started: hand it back at once
                return
        await self._process(msg, event)

    async def _process(self, msg: Msg, event: Event | EventDecodeError | None = None) -> None:
        durable = self.settings.durable
        deliveries = msg.metadata.num_delivered
        if deliveries > self.settings.max_deliver:
            await self._give_up(msg, f"not settled in {deliveries - 1} deliveries: the handler "
                                     "crashed or overran ack_wait, or the message was handed back")
            return
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
        """Dead-letter ``msg`` and ``term`` it; if the dead letter cannot be stored, try later."""
        durable, seq = self.settings.durable, msg.metadata.sequence.stream
        log.error("%s: dead-lettering stream seq %d: %s", durable, seq, reason)
        try:
            await dead_letter(self.bus, msg, consumer=durable, reason=reason)
        except Exception:  # e.g. the same NATS blip that failed the handler: keep the message
            delay = self.settings.backoff_max_s
            log.exception("%s: could not dead-letter stream seq %d, retry in %.2fs",
                          durable, seq, delay)
            await msg.nak(delay=delay)
            return
        await msg.term()
        self.dead_lettered += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(reason)
