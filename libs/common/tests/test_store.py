import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from parley.common import events as ev
from parley.common.store import (
    EventStore,
    append,
    apply_migrations,
    catch_up,
    event_row,
    get_checkpoint,
    migration_files,
)


async def store_events(database_url: str, items: Sequence[ev.Event]) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.cursor() as cursor:
            await append(cursor, [event_row(i, e, None) for i, e in enumerate(items, 1)])


SCRIPT = [
    ev.CallRequested(org_id="o1", call_id="c1", direction="inbound", agent_id="a",
                     from_number="+1", to_number="+2"),
    ev.TranscriptFinal(org_id="o1", call_id="c1", text="hello"),
    ev.CallRequested(org_id="o2", call_id="c2", direction="outbound", agent_id="b",
                     from_number="+3", to_number="+4"),
    ev.AgentCreated(org_id="o1", agent_id="a", name="Ann"),
    ev.CallEnded(org_id="o1", call_id="c1", duration_s=4.0),
]


async def test_migrations_apply_once_in_order(database_url: str) -> None:
    versions = [v for v, _, _ in migration_files()]
    assert versions == sorted(versions) and versions[0] == 1
    assert await apply_migrations(database_url) == []  # the template already has them all
    with psycopg.connect(database_url) as conn:
        recorded = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert recorded == versions


async def test_reads_by_call_range_org_type_and_id(database_url: str) -> None:
    await store_events(database_url, SCRIPT)
    async with AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False) as pool:
        store = EventStore(pool)
        call = await store.read_aggregate("call", "c1")
        assert [s.event for s in call] == [SCRIPT[0], SCRIPT[1], SCRIPT[4]]
        assert [s.position for s in call] == [1, 2, 5]
        assert await store.read_aggregate("call", "c1", org_id="o2") == []  # tenants never mix
        assert [s.position for s in await store.read_aggregate("call", "c1", after=2)] == [5]
        assert [s.event for s in await store.read_aggregate("agent", "a")] == [SCRIPT[3]]
        assert await store.read_aggregate("call", "a") == []  # an agent's id is no call's
        assert [s.position for s in await store.read_range(1, limit=2)] == [2, 3]
        assert [s.position for s in await store.read_range(0, until=2)] == [1, 2]
        requested = await store.read_by_type("o1", ["call.requested", "agent.created"])
        assert [s.event for s in requested] == [SCRIPT[0], SCRIPT[3]]
        found = await store.get(SCRIPT[3].id)
        assert found is not None and found.event == SCRIPT[3] and found.position == 4
        assert await store.max_position() == 5


class TranscriptCount:
    """A projection for the test: transcripts per call; fails on demand."""

    name = "transcript_count"
    tables = ("transcript_count",)

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    async def apply(self, conn: AsyncConnection[Any], tables: Mapping[str, str],
                    batch: Sequence[tuple[int, ev.Event]]) -> None:
        for position, event in batch:
            if position == self.fail_at:
                raise RuntimeError("projection bug")
            if isinstance(event, ev.TranscriptFinal):
                await conn.execute(sql.SQL(
                    "INSERT INTO {} VALUES (%s, 1) ON CONFLICT (call_id) "
                    "DO UPDATE SET n = {}.n + 1").format(
                        sql.Identifier(tables["transcript_count"]),
                        sql.Identifier(tables["transcript_count"])), (event.call_id,))


async def test_catch_up_commits_each_batch_with_its_checkpoint(database_url: str) -> None:
    items = [ev.TranscriptFinal(org_id="o1", call_id=f"c{i % 3}", text="x") for i in range(10)]
    await store_events(database_url, items)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("CREATE TABLE transcript_count (call_id text PRIMARY KEY, n int)")
        await conn.commit()
        with pytest.raises(RuntimeError, match="projection bug"):
            await catch_up(conn, TranscriptCount(fail_at=7), batch_size=4)
        # Batch 1..4 committed with its checkpoint; batch 5..8 rolled back entirely.
        assert await get_checkpoint(conn, "transcript_count") == 4
        total = await (await conn.execute("SELECT sum(n) FROM transcript_count")).fetchone()
        assert total == (4,)
        assert await catch_up(conn, TranscriptCount(), batch_size=4) == 6
        assert await catch_up(conn, TranscriptCount()) == 0  # nothing applied twice
        rows = await (await conn.execute(
            "SELECT call_id, n FROM transcript_count ORDER BY 1")).fetchall()
        assert rows == [("c0", 4), ("c1", 3), ("c2", 3)]


class GatedCount(TranscriptCount):
    """Holds its first batch until released, as a runner that is slow or paused mid-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.holding, self.release = asyncio.Event(), asyncio.Event()

    async def apply(self, conn: AsyncConnection[Any], tables: Mapping[str, str],
                    batch: Sequence[tuple[int, ev.Event]]) -> None:
        if not self.release.is_set():
            self.holding.set()
            await self.release.wait()
        await super().apply(conn, tables, batch)


async def test_two_runners_of_one_projection_apply_each_event_once(database_url: str) -> None:
    """Two instances of a service catching up the same projection at once."""
    items = [ev.TranscriptFinal(org_id="o1", call_id=f"c{i % 3}", text="x") for i in range(10)]
    await store_events(database_url, items)
    async with await psycopg.AsyncConnection.connect(database_url) as slow, \
            await psycopg.AsyncConnection.connect(database_url) as fast:
        await slow.execute("CREATE TABLE transcript_count (call_id text PRIMARY KEY, n int)")
        await slow.commit()
        gated = GatedCount()
        first = asyncio.create_task(catch_up(slow, gated, batch_size=4))
        await gated.holding.wait()  # the first runner has read positions 1..4
        second = asyncio.create_task(catch_up(fast, TranscriptCount()))
        await asyncio.wait({second}, timeout=1.0)  # runs through, or waits for the first
        gated.release.set()
        applied = await first + await second
        assert applied == 10
        assert await get_checkpoint(slow, "transcript_count") == 10
        total = await (await slow.execute("SELECT sum(n) FROM transcript_count")).fetchone()
        assert total == (10,)
