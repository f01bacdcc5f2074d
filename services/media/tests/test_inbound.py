"""Inbound audio: caught up from the AUDIO stream, then live over core NATS — in order, once."""

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable

import pytest

from parley.common import logging as logs
from parley.common.bus import publish_frame
from parley.media.inbound import InboundAudio


class Sink:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.stamps: list[int] = []
        self.delays: list[float] = []

    async def __call__(self, payload: bytes, seq: int, ts_ms: int, sent_at: float,
                       behind: bool) -> None:
        assert time.time() - 10 < sent_at <= time.time()
        assert payload == bytes([seq % 256]) * 160
        self.seqs.append(seq)
        self.stamps.append(ts_ms)


async def publish(bus, call_id: str, seqs: range) -> None:
    for seq in seqs:
        await publish_frame(bus.nc, call_id, "in", bytes([seq % 256]) * 160, seq=seq,
                            timestamp_ms=seq * 20)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def follow(bus, call_id: str, handler, **options) -> InboundAudio:
    """The call's inbound audio, started and caught up."""
    inbound = InboundAudio(bus, call_id, handler, **options)
    await inbound.start()
    await asyncio.wait_for(inbound.caught_up.wait(), 5)
    return inbound


async def assert_frame_2_waited_out_stops_no_other_call(
        bus, call_id: str, other_call_id: str, wait: Callable[[], Awaitable[object]],
        timed_out_error: type[BaseException]) -> None:
    """Frame 2 of call_id is handled by awaiting ``wait()``, which must raise
    ``timed_out_error``; frames 1-3 are still handled in order, and then another call's
    frames 1-3 must still be read."""
    seqs: list[int] = []
    timed_out: list[int] = []

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        if seq == 2:
            try:
                await wait()
            except timed_out_error:
                timed_out.append(seq)
        seqs.append(seq)

    other = Sink()
    inbound = await follow(bus, call_id, sink)
    watching = await follow(bus, other_call_id, other)
    await publish(bus, call_id, range(1, 4))
    await wait_for(lambda: seqs == [1, 2, 3], timeout=3)
    assert timed_out == [2]
    await publish(bus, other_call_id, range(1, 4))
    await wait_for(lambda: len(other.seqs) == 3, timeout=3)
    for follower in (inbound, watching):
        await follower.stop()
    assert other.seqs == [1, 2, 3]


async def test_a_claim_catches_up_from_the_first_frame_then_follows_live(bus) -> None:
    await publish(bus, "c1", range(1, 301))
    await bus.nc.flush()
    await asyncio.sleep(0.1)  # stored
    sink = Sink()
    inbound = await follow(bus, "c1", sink, on_delay=sink.delays.append)
    await publish(bus, "c1", range(301, 351))
    await wait_for(lambda: len(sink.seqs) == 350)
    await inbound.stop()
    assert sink.seqs == list(range(1, 351))
    assert len(sink.delays) == 350 and all(delay >= 0 for delay in sink.delays)
    assert (await bus.js.stream_info("AUDIO")).state.consumer_count == 0  # nothing left behind


async def test_frames_published_during_the_catch_up_arrive_once_and_in_order(bus) -> None:
    await publish(bus, "c2", range(1, 2001))

    async def keep_talking() -> None:
        for seq in range(2001, 2401):
            await publish(bus, "c2", range(seq, seq + 1))
            if seq % 20 == 0:
                await asyncio.sleep(0.002)

    talker = asyncio.create_task(keep_talking())
    sink = Sink()
    inbound = InboundAudio(bus, "c2", sink)
    await inbound.start()
    await talker
    await wait_for(lambda: len(sink.seqs) >= 2400)
    await asyncio.sleep(0.1)
    await inbound.stop()
    assert sink.seqs == list(range(1, 2401))


async def test_a_take_over_resumes_from_the_checkpoint_frame(bus) -> None:
    await publish(bus, "c3", range(1, 101))
    await bus.nc.flush()
    await asyncio.sleep(0.1)
    sink = Sink()
    inbound = await follow(bus, "c3", sink, after_seq=59, since=time.time() - 5)
    await publish(bus, "c3", range(101, 111))
    await wait_for(lambda: len(sink.seqs) == 51)
    await inbound.stop()
    assert sink.seqs == list(range(60, 111))
    assert sink.stamps[0] == 60 * 20


async def test_a_message_that_is_not_a_frame_is_counted_and_skipped(bus) -> None:
    invalid: list[int] = []
    sink = Sink()
    inbound = await follow(bus, "c4", sink, on_invalid=lambda: invalid.append(1))
    await bus.nc.publish("parley.audio.c4.in", b"\x00" * 160)  # no prefix
    await publish(bus, "c4", range(1, 3))
    await wait_for(lambda: len(sink.seqs) == 2)
    await inbound.stop()
    assert invalid == [1] and sink.seqs == [1, 2]


async def test_live_frames_are_handled_in_order_once_each_when_handling_some_waits(bus) -> None:
    # A frame whose handling waits (a publish, a command to the gateway) holds the next ones
    # back until it is done, and one whose handling fails does not stop the next.
    seqs: list[int] = []

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        if seq % 7 == 0:
            await asyncio.sleep(0.005)
        if seq % 50 == 0:
            await asyncio.sleep(0)
            raise RuntimeError("handling failed")
        if seq % 45 == 0:
            raise RuntimeError("failed at once")
        seqs.append(seq)

    inbound = await follow(bus, "c5", sink)
    await publish(bus, "c5", range(1, 301))
    await wait_for(lambda: seqs[-1:] == [299])
    assert seqs == [seq for seq in range(1, 301) if seq % 50 and seq % 45]
    assert inbound._sub is not None and inbound._sub.pending_bytes == 0  # nothing counted as
    # pending (past the subscription's limit, the client would drop the call's frames)
    await inbound.stop()


async def test_a_frame_handled_without_waiting_costs_no_task(bus) -> None:
    # The client used to hand each frame to a task of the subscription's own (a wake-up per
    # frame per call); a frame whose handling never waits is now handled as it is read.
    # (On Python 3.11 the subscription has a task of its own, made at the start, for what waits.)
    sink = Sink()
    inbound = await follow(bus, "c6", sink)
    await asyncio.sleep(0.01)  # the catch-up's task is over
    tasks = asyncio.all_tasks()
    await publish(bus, "c6", range(1, 51))
    await wait_for(lambda: len(sink.seqs) == 50)
    assert sink.seqs == list(range(1, 51))
    assert not [task for task in asyncio.all_tasks() - tasks if not task.done()]
    await inbound.stop()


async def test_stop_cancels_a_frame_handler_that_waits_and_nothing_follows(bus) -> None:
    seqs: list[int] = []
    cancelled = asyncio.Event()

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        seqs.append(seq)
        if seq == 3:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    inbound = await follow(bus, "c7", sink)
    await publish(bus, "c7", range(1, 11))
    await wait_for(lambda: seqs == [1, 2, 3])
    await asyncio.wait_for(inbound.stop(), 2)
    assert cancelled.is_set()
    await publish(bus, "c7", range(11, 13))
    await asyncio.sleep(0.1)
    assert seqs == [1, 2, 3]


async def test_a_frame_handler_failing_at_once_stops_no_other_subscription(bus) -> None:
    # Handled as the client reads it, a frame whose handling fails before it ever waits (even
    # with a cancellation: awaiting a task already cancelled) must not stop the client's reader.
    seqs: list[int] = []

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        if seq == 2:
            raise asyncio.CancelledError
        seqs.append(seq)

    other = Sink()
    inbound = await follow(bus, "c8", sink)
    watching = await follow(bus, "c9", other)
    await publish(bus, "c8", range(1, 4))
    await publish(bus, "c9", range(1, 4))
    await wait_for(lambda: len(other.seqs) == 3)
    for follower in (inbound, watching):
        await follower.stop()
    assert other.seqs == [1, 2, 3] and seqs[:1] == [1]


@pytest.mark.parametrize("delay", [0.2, 0.0])
async def test_a_frame_handler_timing_out_before_it_first_waits_stops_no_other_subscription(
        bus, delay: float) -> None:
    # Handled as the client reads it, a frame's first steps run before any task of its own; a
    # timeout started there must cancel the handler on expiry, not the client's reader (which
    # would stop reading for every subscription of the connection). At once too: expiring
    # before a task has taken the handler's rest over.
    async def timing_out() -> None:  # started in the frame's first steps
        async with asyncio.timeout(delay):
            await asyncio.sleep(5)

    await assert_frame_2_waited_out_stops_no_other_call(bus, "c10", "c11", timing_out,
                                                        TimeoutError)


async def test_a_request_unanswered_from_a_frame_handler_stops_no_other_subscription(
        bus) -> None:
    # The barge-in clear is a request to the gateway, from the frame path; on Python 3.12+
    # its timeout is an asyncio.timeout of the task that asks: a gateway answering late must
    # not stop the client's reader.
    import nats.errors

    silent = await bus.nc.subscribe("parley.test.silent")  # listens, never answers
    async def unanswered() -> object:
        return await bus.nc.request("parley.test.silent", b"clear", timeout=0.2)

    await assert_frame_2_waited_out_stops_no_other_call(bus, "c12", "c13", unanswered,
                                                        nats.errors.TimeoutError)
    await silent.unsubscribe()


async def test_a_frame_handler_cancelled_after_it_waited_does_not_hold_the_next_frames(
        bus) -> None:
    # A cancellation out of a handler that waited (not the stop's) is its failure, logged:
    # the frames behind it are still handled.
    seqs: list[int] = []

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        if seq == 2:
            await asyncio.sleep(0.01)
            raise asyncio.CancelledError
        seqs.append(seq)

    inbound = await follow(bus, "c14", sink)
    await publish(bus, "c14", range(1, 6))
    await wait_for(lambda: seqs == [1, 3, 4, 5], timeout=3)
    await inbound.stop()


@pytest.mark.parametrize("wait_first", [False, True])
async def test_a_frame_handler_may_stop_its_own_inbound_audio(bus, wait_first: bool) -> None:
    # (A session ending on a frame.) The stop completes, nothing after it is handled, and no
    # task is left behind.
    seqs: list[int] = []
    stopped: list[int] = []

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        seqs.append(seq)
        if seq == 2:
            if wait_first:
                await asyncio.sleep(0.01)
            await inbound.stop()
            stopped.append(seq)

    inbound = await follow(bus, "c15", sink)
    tasks = asyncio.all_tasks()
    await publish(bus, "c15", range(1, 6))
    await wait_for(lambda: stopped == [2], timeout=3)
    await asyncio.sleep(0.1)
    assert seqs == [1, 2] and inbound._sub is None
    assert not [task for task in asyncio.all_tasks() | tasks if not task.done()
                and (task.get_name() or "").startswith("audio-in:c15")]


async def test_a_frame_handler_runs_in_the_context_of_whoever_follows_the_call(bus) -> None:
    # As with nats-py's own task (made at the subscribe, in the subscriber's context): what the
    # session set before it followed the call (log_context's call fields, a trace's span) is
    # what its frame handler sees, before its first wait and after, not the NATS reader's.
    seen: list[tuple[int, str, str]] = []
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")

    def now(seq: int, when: str) -> None:
        seen.append((seq, when, f"{marker.get()}/{logs._context.get().get('call_id', '-')}"))

    async def sink(payload: bytes, seq: int, ts_ms: int, sent_at: float,
                   behind: bool) -> None:
        now(seq, "first")
        if seq % 2 == 0:
            await asyncio.sleep(0.001)
            now(seq, "after")

    async def session() -> InboundAudio:
        marker.set("session")
        with logs.log_context(call_id="c16"):
            return await follow(bus, "c16", sink)

    inbound = await asyncio.create_task(session())
    await publish(bus, "c16", range(1, 5))
    await wait_for(lambda: len(seen) == 6)
    await inbound.stop()
    assert seen == [(1, "first", "session/c16"), (2, "first", "session/c16"),
                    (2, "after", "session/c16"), (3, "first", "session/c16"),
                    (4, "first", "session/c16"), (4, "after", "session/c16")]
