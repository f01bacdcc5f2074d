"""Inbound audio: caught up from the AUDIO stream, then live over core NATS — in order, once."""

import asyncio
import time

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


async def test_a_claim_catches_up_from_the_first_frame_then_follows_live(bus) -> None:
    await publish(bus, "c1", range(1, 301))
    await bus.nc.flush()
    await asyncio.sleep(0.1)  # stored
    sink = Sink()
    inbound = InboundAudio(bus, "c1", sink, on_delay=sink.delays.append)
    await inbound.start()
    await asyncio.wait_for(inbound.caught_up.wait(), 5)
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
    inbound = InboundAudio(bus, "c3", sink, after_seq=59, since=time.time() - 5)
    await inbound.start()
    await asyncio.wait_for(inbound.caught_up.wait(), 5)
    await publish(bus, "c3", range(101, 111))
    await wait_for(lambda: len(sink.seqs) == 51)
    await inbound.stop()
    assert sink.seqs == list(range(60, 111))
    assert sink.stamps[0] == 60 * 20


async def test_a_message_that_is_not_a_frame_is_counted_and_skipped(bus) -> None:
    invalid: list[int] = []
    sink = Sink()
    inbound = InboundAudio(bus, "c4", sink, on_invalid=lambda: invalid.append(1))
    await inbound.start()
    await asyncio.wait_for(inbound.caught_up.wait(), 5)
    await bus.nc.publish("parley.audio.c4.in", b"\x00" * 160)  # no prefix
    await publish(bus, "c4", range(1, 3))
    await wait_for(lambda: len(sink.seqs) == 2)
    await inbound.stop()
    assert invalid == [1] and sink.seqs == [1, 2]
