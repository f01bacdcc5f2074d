"""Durable pull consumers: work that must happen exactly once.

The runner fetches from a durable JetStream consumer, decodes each event, calls the handler and
acks only after the handler returns — so the handler must commit its effect (keyed by event id)
before returning. Transient failures are nak'ed with exponential backoff; a message that can never
succeed (undecodable, :class:`PermanentError`, or out of attempts) is copied to the dead-letter
stream with the reason and ``term``-ed, so it never blocks the messages behind it.
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
                 on_dead_letter: Callable[[str], None] | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.handler = handler
        self._on_dead_letter = on_dead_letter
        self._task: asyncio.Task[None] | None = None
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
        """Finish the message in hand, then stop pulling (the durable stays on the server)."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.settings.batch, timeout=0.5)
            except (TimeoutError, FetchTimeoutError, NatsTimeoutError):
                continue
            except Exception:
                if self._stopping.is_set() or self.bus.nc.is_closed:
                    return
                log.exception("fetch failed on %s", self.settings.durable)
                await asyncio.sleep(0.5)
                continue
            for index, msg in enumerate(msgs):
                if self._stopping.is_set():
                    # Hand the rest back at once rather than waiting out ack_wait.
                    for rest in msgs[index:]:
                        await rest.nak()
                    return
                await self._process(msg)

    async def _process(self, msg: Msg) -> None:
        durable = self.settings.durable
        try:
            event = decode(msg.data)
        except EventDecodeError as exc:
            await self._give_up(msg, f"undecodable: {exc}")
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
