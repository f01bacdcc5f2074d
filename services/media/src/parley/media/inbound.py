"""A call's inbound audio: live over core NATS, what was missed caught up from the AUDIO stream.

Live frames come through a core subscription on ``parley.audio.<call>.in``: core latency, no
JetStream flow control, heartbeats or per-message metadata. What a session missed — the start
of the call on a claim, the audio since the lease's checkpoint on a take-over — is read from the
AUDIO stream with an ephemeral pull consumer. The core subscription is made (and confirmed by
the server) first and buffers while the catch-up runs, so no frame falls between the two;
frames that arrive both ways are dropped by their sequence number. Frames reach the sink in
order, each once, with the time the gateway sent them (the frame's own prefix, see
:mod:`parley.common.bus.audio`); the delay from then to the sink is reported per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

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
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Subscribe live (buffering), then catch up in the background."""
        nc = self.bus.nc
        self._sub = await nc.subscribe(audio_subject(self.call_id, "in"), cb=self._on_live)
        await nc.flush()  # the server has the subscription: every later frame reaches us live
        self._task = asyncio.create_task(self._catch_up(), name=f"audio-catch-up:{self.call_id}")

    async def stop(self) -> None:
        """Stop following (idempotent)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
