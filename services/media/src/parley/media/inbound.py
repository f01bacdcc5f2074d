"""A call's inbound audio: live over core NATS, what was missed caught up from the AUDIO stream.

Live frames come through a core subscription on ``parley.audio.<call>.in``: core latency, no
JetStream flow control, heartbeats or per-message metadata. What a session missed — the start
of the call on a claim, the audio since the lease's checkpoint on a take-over — is read from the
AUDIO stream with an ephemeral pull consumer. The core subscription is made (and confirmed by
the server) first and buffers while the catch-up runs, so no frame falls between the two;
frames that arrive both ways are dropped by their sequence number. Frames reach the sink in
order, each once, with the time the gateway sent them (the frame's own prefix, see
:mod:`parley.common.bus.audio`); the delay from then to the sink is reported per frame. A live
frame is handled as the client reads it, with no task of the subscription's own to wake
(:class:`InlineDelivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from parley.common.bus import Bus, audio_subject
from parley.common.bus.audio import FrameFormatError, decode_frame
from parley.common.bus.streams import AUDIO_STREAM

log = logging.getLogger(__name__)

# payload, seq, audio ms, sent (epoch s), catching up (behind live by more than a little)
FrameSink = Callable[[bytes, int, int, float, bool], Awaitable[None]]
CATCH_UP_BATCH = 250
BEHIND_FRAMES = 25  # a caught-up frame with more than this many after it: still catching up


class InboundAudio:
    """Follows one call's inbound frames from a resume point, then live.

    ``after_seq``: frames up to this sequence number were handled already (-1: none).
    ``since``: where the catch-up starts — ``None`` from the first frame the stream holds, else
    an epoch time (frames stored from then on; those up to ``after_seq`` are skipped).
    """

    def __init__(self, bus: Bus, call_id: str, sink: FrameSink, *, after_seq: int = -1,
                 since: float | None = None,
                 on_delay: Callable[[float], None] = lambda delay_s: None,
                 on_invalid: Callable[[], None] = lambda: None) -> None:
        self.bus = bus
        self.call_id = call_id
        self.sink = sink
        self.since = since
        self.on_delay = on_delay
        self.on_invalid = on_invalid
        self.last_seq = after_seq
        self.caught_up = asyncio.Event()
        self._buffer: deque[Msg] | None = deque()  # live frames held during the catch-up
        self._sub: Subscription | None = None
        self._inline: InlineDelivery | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Subscribe live (buffering), then catch up in the background."""
        nc = self.bus.nc
        self._sub = await nc.subscribe(audio_subject(self.call_id, "in"))
        self._inline = InlineDelivery.take_over(self._sub, self._on_live,
                                                name=f"audio-in:{self.call_id}")
        await nc.flush()  # the server has the subscription: every later frame reaches us live
        self._task = asyncio.create_task(self._catch_up(), name=f"audio-catch-up:{self.call_id}")

    async def stop(self) -> None:
        """Stop following (idempotent)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inline is not None:
            await self._inline.close()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    # -- live -------------------------------------------------------------------------------

    async def _on_live(self, msg: Msg) -> None:
        if self._buffer is not None:
            self._buffer.append(msg)
            return
        await self._deliver(msg, False)

    # -- catch-up ---------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        try:
            await self._read_stream()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Live audio still flows; what the stream held is lost to this session.
            log.exception("call %s: inbound audio catch-up failed", self.call_id)
        buffer = self._buffer
        assert buffer is not None
        while buffer and not self._stopped:
            await self._deliver(buffer.popleft(), False)
        self._buffer = None  # no await since the buffer was last seen empty: order is kept
        self.caught_up.set()

    async def _read_stream(self) -> None:
        subject = audio_subject(self.call_id, "in")
        if self.since is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.datetime.fromtimestamp(self.since, datetime.UTC))
        config.filter_subject = subject
        config.ack_policy = AckPolicy.NONE
        config.inactive_threshold = 30.0
        config.mem_storage = True
        js = self.bus.js
        sub = await js.pull_subscribe(subject, stream=AUDIO_STREAM, config=config)
        name = ""
        try:
            info = await sub.consumer_info()
            name = info.name
            remaining = info.num_pending or 0
            while remaining > 0 and not self._stopped:
                try:
                    msgs = await sub.fetch(min(CATCH_UP_BATCH, remaining), timeout=2.0)
                except TimeoutError:
                    break  # the stream shrank (max_age) after we counted
                for msg in msgs:
                    remaining = msg.metadata.num_pending
                    await self._deliver(msg, remaining > BEHIND_FRAMES)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name:
                with contextlib.suppress(NotFoundError, Exception):
                    await js.delete_consumer(AUDIO_STREAM, name)

    # -- both -------------------------------------------------------------------------------

    async def _deliver(self, msg: Msg, behind: bool) -> None:
        try:
            seq, ts_ms, sent_ns, payload = decode_frame(msg.data)
        except FrameFormatError:
            self.on_invalid()
            return
        if seq <= self.last_seq:
            return  # seen already (from the stream and live, or before a take-over)
        self.last_seq = seq
        sent_at = sent_ns / 1e9
        self.on_delay(time.time() - sent_at)
        await self.sink(payload, seq, ts_ms, sent_at, behind)


class InlineDelivery:
    """A core subscription's messages handed to an async handler as they are read, in order.

    nats-py queues each message of a subscription with a callback (an ``asyncio.Queue``) for a
    task of the subscription's own, which the queue wakes: a wake-up, a task step and a queue
    round trip per message, about 3 µs — for media, per caller and 20 ms frame, more than the
    frame's VAD. This stands in for that queue (``Subscription._pending_queue``, of the pinned
    nats-py): a message is handed to the handler at once, by the client's reader, which runs it
    until it first waits (as Python 3.12's eager tasks do); only then does a task take over the
    rest, and messages that come meanwhile wait behind it, each handled in turn as before. A
    frame whose handling never waits, the common case, costs no task switch.

    As with nats-py's queue: one message at a time, in order, each once; a handler's error is
    logged and the next message handled; pending messages and bytes count against the
    subscription's limits (a slow consumer's messages are dropped past them, by the client).
    Unlike it, the handler's first steps run in the reader's context, not a task's:
    ``asyncio.current_task()`` there is the reader, so the handler must not cancel it, nor use
    ``asyncio.timeout`` before its first wait (nothing on the frame path does).
    """

    def __init__(self, sub: Subscription, handler: Callable[[Msg], Awaitable[None]], *,
                 name: str) -> None:
        self._sub = sub
        self._handler = handler
        self._name = name
        self._maxsize = sub._pending_msgs_limit
        self._backlog: deque[Msg] = deque()  # what came while a handler waited
        self._task: asyncio.Task[None] | None = None  # the rest of a handler that waited
        self._closed = False

    @classmethod
    def take_over(cls, sub: Subscription, handler: Callable[[Msg], Awaitable[None]], *,
                  name: str) -> InlineDelivery:
        """Deliver ``sub``'s messages (a subscription made without a callback) to ``handler``.

        Call it right after the subscribe, with no wait between: anything the subscription
        queued before is handed over first.
        """
        inline = cls(sub, handler, name=name)
        queued: asyncio.Queue[Msg] = sub._pending_queue
        sub._pending_queue = inline  # type: ignore[assignment]
        while not queued.empty():
            inline.put_nowait(queued.get_nowait())
        return inline

    # -- what nats-py asks of a subscription's queue -----------------------------------------

    def put_nowait(self, msg: Msg) -> None:
        """A message read for the subscription: handle it now, or after the one waiting."""
        if self._closed:
            return
        if self._task is not None:
            if 0 < self._maxsize <= len(self._backlog):
                raise asyncio.QueueFull  # the client counts it a slow consumer and drops it
            self._backlog.append(msg)
            return
        self._sub._pending_size -= len(msg.data)
        coro = self._handler(msg)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except (Exception, asyncio.CancelledError):
            # Not raised into the client's reader, which would stop reading for every
            # subscription (a cancellation too: awaiting a task already cancelled raises at once).
            log.exception("%s: message handler failed", self._name)
            return
        self._task = asyncio.get_running_loop().create_task(self._finish(coro, waiting),
                                                            name=self._name)

    def qsize(self) -> int:
        """Messages waiting (behind a handler that waits)."""
        return len(self._backlog)

    def empty(self) -> bool:
        """Nothing waiting."""
        return not self._backlog

    def full(self) -> bool:
        """No room for another message."""
        return 0 < self._maxsize <= len(self._backlog)

    def task_done(self) -> None:
        """Nothing to count here (asyncio.Queue's, for its join)."""

    async def join(self) -> None:
        """Until every message so far is handled (the subscription's drain)."""
        while (task := self._task) is not None and not task.done():
            await asyncio.wait([task])

    # -- ours ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Handle no more: a handler waiting is cancelled, messages waiting are dropped."""
        self._closed = True
        self._backlog.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _finish(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        try:
            await _Rest(coro, waiting)
        except Exception:
            log.exception("%s: message handler failed", self._name)
        while self._backlog and not self._closed:
            msg = self._backlog.popleft()
            self._sub._pending_size -= len(msg.data)
            try:
                await self._handler(msg)
            except Exception:
                log.exception("%s: message handler failed", self._name)
        if not self._closed:
            self._task = None  # no wait since the backlog was seen empty: nothing is left behind


class _Rest:
    """The rest of a coroutine already run by hand to its first wait, for a task to await.

    ``waiting`` is what it yielded there; awaited, this is what ``await coro`` would have been
    from there on.
    """

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task: a cancellation
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration:
                    return
