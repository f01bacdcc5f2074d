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
import contextvars
import datetime
import logging
import sys
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

_EAGER = sys.version_info >= (3, 12)  # asyncio's eager tasks
if not _EAGER:
    # What asyncio.current_task reads (the C functions' or not).
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

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
    until it first waits; only then does a task wait for the rest, and messages that come
    meanwhile wait behind it, each handled in turn as before. A frame whose handling never
    waits, the common case, costs no task switch.

    Those first steps run as a task's, never as the reader's: ``asyncio.current_task()`` there
    is the task that finishes the handling, so what cancels it — an ``asyncio.timeout`` expiring
    (on Python 3.12+ ``asyncio.wait_for`` and so ``nc.request`` are one), a task group — stops
    the handler, not the reader (which would stop reading for every subscription of the
    connection). On Python 3.12+ each handling is an eager task (``eager_start``: run at once
    until it first waits, registered as a task only then). On 3.11, which has none, the steps
    are run by hand with the current task (and context) set to a task of the subscription's
    own, as nats-py's was: the handler's rest is handed to it, and a cancellation that reaches
    it before it takes the rest over is passed on to the handler as a task would.

    As with nats-py's queue: one message at a time, in order, each once; a handler's error is
    logged and the next message handled (a cancellation too, unless one asked of its task:
    :meth:`close`'s, the loop's at its end — then nothing more is handled); pending messages
    and bytes count against the subscription's limits (a slow consumer's messages are dropped
    past them, by the client). :meth:`close` it when done.
    """

    def __init__(self, sub: Subscription, handler: Callable[[Msg], Awaitable[None]], *,
                 name: str) -> None:
        self._sub = sub
        self._handler = handler
        self._name = name
        self._maxsize = sub._pending_msgs_limit
        self._loop = asyncio.get_running_loop()
        self._backlog: deque[Msg] = deque()  # what came while a handler waited
        # While a handler that waited, then the backlog behind it, is handled: done after.
        self._busy: asyncio.Future[None] | None = None
        self._closed = False
        # Handlers run in the context of whoever made the subscription, as nats-py's task did
        # (the reader's is the client's: no call's log fields, no span of the session's).
        self._context = contextvars.copy_context()
        if not _EAGER:  # Python 3.11
            self._handoff: tuple[Coroutine[Any, Any, None], Any] | None = None
            self._wake: asyncio.Future[None] | None = None
            self._worker = self._loop.create_task(self._work(), name=name, context=self._context)

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
        if self._busy is not None:
            if 0 < self._maxsize <= len(self._backlog):
                raise asyncio.QueueFull  # the client counts it a slow consumer and drops it
            self._backlog.append(msg)
            return
        self._sub._pending_size -= len(msg.data)
        if _EAGER:
            task = asyncio.Task(self._run(msg), loop=self._loop,  # type: ignore[call-arg]
                                name=self._name, context=self._context, eager_start=True)
            if not task.done():
                self._busy = task
            return
        # Python 3.11: run the handler to its first wait as the subscription's task, in its
        # context (the current task swapped as 3.12's eager tasks do; here, the C functions'
        # own record, asyncio.tasks._current_tasks, cheaper than leaving and entering twice).
        coro: Coroutine[Any, Any, None] = self._handler(msg)  # type: ignore[assignment]
        loop = self._loop
        reader = _current_tasks.get(loop)
        _current_tasks[loop] = self._worker
        try:
            waiting = self._context.run(coro.send, None)
        except StopIteration:
            return
        except (Exception, asyncio.CancelledError):
            # Not raised into the client's reader, which would stop reading for every
            # subscription (a cancellation too: awaiting a task already cancelled raises at once).
            log.exception("%s: message handler failed", self._name)
            return
        finally:
            if reader is None:
                del _current_tasks[loop]
            else:
                _current_tasks[loop] = reader
        self._handoff = (coro, waiting)
        self._busy = loop.create_future()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

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
        while (busy := self._busy) is not None and not busy.done():
            await asyncio.wait([busy])

    # -- ours ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Handle no more: a handler waiting is cancelled, messages waiting are dropped."""
        self._closed = True
        self._backlog.clear()
        task = self._busy if _EAGER else self._worker
        if task is None:
            return
        if task is asyncio.current_task():  # by a handler: its task ends after it
            if not _EAGER and self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self, msg: Msg) -> None:
        """Python 3.12+: one message's handling, as an eager task, then those behind it."""
        while True:
            await self._handled(self._handler(msg))
            if self._closed or not self._backlog:
                break
            msg = self._backlog.popleft()
            self._sub._pending_size -= len(msg.data)
        if not self._closed:
            self._busy = None  # no wait since the backlog was seen empty: nothing is left behind

    async def _handled(self, handling: Awaitable[None]) -> None:
        """Await a message's handling: its error is logged and the next message handled.

        A cancellation too, unless it is one of the task's own (:meth:`_stopping`): then it is
        raised, and nothing more is handled.
        """
        try:
            await handling
        except Exception:
            log.exception("%s: message handler failed", self._name)
        except asyncio.CancelledError:
            if self._stopping():
                raise
            log.exception("%s: message handler failed", self._name)

    def _stopping(self) -> bool:
        """Whether a handler's cancellation is one of its task's: then nothing more is handled.

        One asked of the task — :meth:`close`'s, the loop's at its end, or a handler's of its
        own task — stops the handling here; any other (awaiting a task already cancelled) is
        the handler's failure, and the next message is handled.
        """
        task = asyncio.current_task()
        if self._closed or (task is not None and task.cancelling()):
            self._closed = True
            self._backlog.clear()
            return True
        return False

    # -- Python 3.11 ---------------------------------------------------------------------------

    async def _work(self) -> None:
        """The subscription's task: what it is handed of a handler, then what came meanwhile."""
        loop = self._loop
        try:
            while not self._closed:
                self._wake = loop.create_future()
                cancel: asyncio.CancelledError | None = None
                try:
                    await self._wake
                except asyncio.CancelledError as exc:
                    if self._handoff is None or self._closed:
                        self._closed = True
                        self._backlog.clear()
                        raise
                    # Meant for the handler run as this task (its timeout expiring at once)
                    # before this took its rest over.
                    cancel = exc
                if self._handoff is None:
                    continue
                coro, waiting = self._handoff
                self._handoff = None
                await self._handled(_Rest(coro, waiting, cancel))
                while self._backlog and not self._closed:
                    msg = self._backlog.popleft()
                    self._sub._pending_size -= len(msg.data)
                    await self._handled(self._handler(msg))
                busy, self._busy = self._busy, None
                if busy is not None:
                    busy.set_result(None)
        finally:
            self._closed = True  # nothing more would be handled
            self._backlog.clear()
            if self._handoff is not None:
                self._handoff[0].close()
                self._handoff = None
            if self._busy is not None and not self._busy.done():
                self._busy.set_result(None)


class _Rest:
    """The rest of a coroutine already run by hand to its first wait, for a task to await.

    ``waiting`` is what it yielded there; awaited, this is what ``await coro`` would have been
    from there on. ``cancel``: a cancellation of the task meant for the coroutine before the
    task took it over, passed on as the task would have (the future it waits on cancelled, or
    thrown in).
    """

    __slots__ = ("_cancel", "_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any,
                 cancel: asyncio.CancelledError | None = None) -> None:
        self._coro = coro
        self._waiting = waiting
        self._cancel = cancel

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting, cancel = self._coro, self._waiting, self._cancel
        if cancel is not None and not (
                getattr(waiting, "_asyncio_future_blocking", None) is not None
                and waiting.cancel(msg=cancel.args[0] if cancel.args else None)):
            try:
                waiting = coro.throw(cancel)
            except StopIteration:
                return
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
