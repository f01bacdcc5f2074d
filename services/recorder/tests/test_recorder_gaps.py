"""Stream positions the recorder's consumer skipped: lost in transit, deleted or expired."""


from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus

from .conftest import TcpProxy, wait_for
from .test_recorder import _at, rows, running_recorder


class DroppingProxy(TcpProxy):
    """Drops the first server-to-client chunk containing ``marker``.

    What a connection cut mid-delivery leaves behind (the server sent the message, the client
    never got it), without depending on how fast the client reconnects.
    """

    def __init__(self, target_port: int, marker: bytes) -> None:
        super().__init__(target_port)
        self.marker = marker
        self.dropped = False

    def keep(self, data: bytes, *, to_client: bool) -> bool:
        if to_client and not self.dropped and self.marker in data:
            self.dropped = True
            return False
        return True


async def test_a_delivery_lost_in_transit_is_pulled_again_not_dead_lettered(
        nats_url: str, bus: Bus, database_url: str) -> None:
    proxy = DroppingProxy(int(nats_url.rsplit(":", 1)[1]), b"LOSE-ME")
    recorder_bus = await Bus.connect(f"nats://127.0.0.1:{await proxy.start()}", name="recorder")
    try:
        await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="one"))
        async with running_recorder(recorder_bus, database_url, batch_size=100):
            await wait_for(lambda: _at(database_url, 1))
            await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="LOSE-ME"))
            await wait_for(lambda: proxy.dropped)
            for text in ("three", "four"):
                await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text=text))
            await wait_for(lambda: _at(database_url, 4))
    finally:
        await recorder_bus.close()
        await proxy.close()
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == \
        [(1,), (2,), (3,), (4,)]
    assert rows(database_url, "SELECT position FROM dead_letters") == []


async def test_deleted_and_expired_positions_become_dead_letters(
        bus: Bus, database_url: str) -> None:
    for i in range(6):
        await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text=str(i)))
    await bus.js.purge_stream(EVENTS_STREAM, seq=3)  # 1 and 2 are gone: what max_age does
    await bus.js.delete_msg(EVENTS_STREAM, 5)
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 6))
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(3,), (4,), (6,)]
    dead = rows(database_url, "SELECT position, reason FROM dead_letters ORDER BY 1")
    assert [p for p, _ in dead] == [1, 2, 5]
    assert "expired" in dead[0][1] and "expired" in dead[1][1]
    assert "deleted" in dead[2][1] and "expired" not in dead[2][1]


async def test_a_long_gap_is_recorded_in_bounded_chunks(bus: Bus, database_url: str) -> None:
    gap = 25_000
    await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="one"))
    # Everything up to position gap + 1 is gone: the recorder was down past the max age.
    await bus.js.purge_stream(EVENTS_STREAM, seq=gap + 2)
    await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="after"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, gap + 2), timeout=30)
    assert rows(database_url, "SELECT position FROM events") == [(gap + 2,)]
    assert rows(database_url, "SELECT count(*), min(position), max(position) FROM dead_letters") \
        == [(gap + 1, 1, gap + 1)]
    # A transaction per chunk (recorded_at is the transaction's start), not one for them all.
    (chunks,), = rows(database_url, "SELECT count(DISTINCT recorded_at) FROM dead_letters")
    assert chunks > 1
