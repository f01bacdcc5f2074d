"""Reading and appending the permanent event store (the ``events`` table)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection, AsyncCursor
from psycopg_pool import AsyncConnectionPool

from ..events import Event, decode, encode

# data is read as text and decoded by msgspec: much faster than psycopg's json.loads.
_COLUMNS = "position, recorded_at, data::text, trace"


class StoredEvent(msgspec.Struct, frozen=True):
    """An event with where and when the store recorded it."""

    position: int
    event: Event
    recorded_at: datetime
    trace: str | None = None


class DeadLetter(msgspec.Struct, frozen=True):
    """A stream position the recorder kept in ``dead_letters`` instead of ``events``, and why."""

    position: int
    subject: str
    reason: str
    recorded_at: datetime


def _row_to_stored(row: Sequence[Any]) -> StoredEvent:
    return StoredEvent(position=row[0], event=decode(row[2]), recorded_at=row[1], trace=row[3])


def event_row(position: int, event: Event, trace: str | None,
              encoded: bytes | None = None) -> tuple[Any, ...]:
    """The ``events`` row for an event at a stream position (for COPY, in column order).

    ``data`` is the event's own JSON (it includes the ``type`` tag, so a row decodes on its own);
    pass the bytes already on the wire as ``encoded`` to skip re-encoding.
    """
    data = (encoded if encoded is not None else encode(event)).decode()
    return (position, event.id, event.org_id, event.aggregate, event.aggregate_id, event.type,
            event.v, event.at, event.causation_id, data, trace)


async def append(cursor: AsyncCursor[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """Append event rows with COPY inside the caller's transaction.

    A position or event id that is already stored makes the whole transaction fail: callers
    (the recorder) guarantee each position is written once by moving their checkpoint in the
    same transaction.
    """
    async with cursor.copy(
        "COPY events (position, event_id, org_id, aggregate, aggregate_id, type, v, at, "
        "causation_id, data, trace) FROM STDIN"
    ) as copy:
        for row in rows:
            await copy.write_row(row)


async def get_checkpoint(conn: AsyncConnection[Any], name: str) -> int:
    """The last position a reader has committed (0 when it never ran)."""
    cursor = await conn.execute("SELECT position FROM checkpoints WHERE name = %s", (name,))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def set_checkpoint(conn: AsyncConnection[Any], name: str, position: int) -> None:
    """Move a reader's checkpoint (call inside the transaction that covers its effects)."""
    await conn.execute(
        "INSERT INTO checkpoints (name, position) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
        "SET position = excluded.position, updated_at = now()", (name, position))


class EventStore:
    """Queries over ``events``; tenant-scoped reads take the org id."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def _query(self, sql: str, params: Sequence[Any]) -> list[StoredEvent]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(f"SELECT {_COLUMNS} FROM events {sql}", params)
            return [_row_to_stored(row) for row in await cursor.fetchall()]

    async def read_aggregate(self, aggregate: str, aggregate_id: str, *,
                             org_id: str | None = None, after: int = 0) -> list[StoredEvent]:
        """All events of one call (``"call"``, its id) or agent, org… in order.

        Only the org's when given. An id alone could be an agent's as well as a call's.
        """
        if org_id is None:
            return await self._query(
                "WHERE aggregate_id = %s AND aggregate = %s AND position > %s ORDER BY position",
                (aggregate_id, aggregate, after))
        return await self._query(
            "WHERE aggregate_id = %s AND aggregate = %s AND org_id = %s AND position > %s "
            "ORDER BY position", (aggregate_id, aggregate, org_id, after))

    async def read_dead_letters(self, aggregate: str, aggregate_id: str, *,
                                org_id: str | None = None) -> list[DeadLetter]:
        """Dead letters that came on one aggregate's subjects, in order; the org's when given.

        Only those whose subject is known (``parley.ev.<org>.<aggregate>.<id>.<type>``): not
        positions missing from the stream, nor duplicates, whose original is in ``events``.
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT position, subject, reason, recorded_at FROM dead_letters "
                "WHERE subject LIKE 'parley.ev.%%' AND split_part(subject, '.', 4) = %(aggregate)s "
                "AND split_part(subject, '.', 5) = %(id)s "
                "AND (%(org)s::text IS NULL OR split_part(subject, '.', 3) = %(org)s) "
                "ORDER BY position", {"aggregate": aggregate, "id": aggregate_id, "org": org_id})
            return [DeadLetter(*row) for row in await cursor.fetchall()]

    async def read_range(self, after: int, *, limit: int = 1000,
                         until: int | None = None) -> list[StoredEvent]:
        """Events with ``after < position [<= until]`` in order, at most ``limit``."""
        if until is None:
            return await self._query("WHERE position > %s ORDER BY position LIMIT %s",
                                     (after, limit))
        return await self._query(
            "WHERE position > %s AND position <= %s ORDER BY position LIMIT %s",
            (after, until, limit))

    async def read_by_type(self, org_id: str, types: Sequence[str], *, after: int = 0,
                           limit: int = 1000) -> list[StoredEvent]:
        """One org's events of the given types, in order."""
        return await self._query(
            "WHERE org_id = %s AND type = ANY(%s) AND position > %s ORDER BY position LIMIT %s",
            (org_id, list(types), after, limit))

    async def get(self, event_id: uuid.UUID) -> StoredEvent | None:
        """One event by id."""
        found = await self._query("WHERE event_id = %s", (event_id,))
        return found[0] if found else None

    async def max_position(self) -> int:
        """The highest stored position (0 when empty)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT coalesce(max(position), 0) FROM events")
            row = await cursor.fetchone()
            return int(row[0]) if row else 0
