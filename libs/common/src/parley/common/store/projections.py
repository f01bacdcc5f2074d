"""Projections (read models) over the event store, and their rebuild.

A projection folds events into tables it owns. Applying a batch and moving the projection's
checkpoint happen in one transaction, so a crash never applies an event twice. Any projection can
be rebuilt from ``events``: into shadow tables first, then swapped in under the same lock the
recorder takes per batch, so readers never see a half-built table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

import msgspec
from psycopg import AsyncConnection, sql

from ..events import Event, decode
from .event_store import set_checkpoint

# Held (per transaction) by the recorder for each batch and by a rebuild while it swaps tables.
WRITE_LOCK = 0x70726F6A  # "proj"


class Projection(Protocol):
    """A read model: the tables it owns and how a batch of events changes them."""

    name: str
    tables: tuple[str, ...]

    async def apply(self, conn: AsyncConnection[Any], tables: Mapping[str, str],
                    batch: Sequence[tuple[int, Event]]) -> None:
        """Apply events (position, event) in order; ``tables`` maps owned names to real ones."""


class RebuildReport(msgspec.Struct, frozen=True):
    """What a rebuild did."""

    projection: str
    events: int
    position: int
    seconds: float


def installed_projections() -> dict[str, Projection]:
    """Projections declared by installed services (entry point group ``parley.projections``)."""
    found: dict[str, Projection] = {}
    for entry in entry_points(group="parley.projections"):
        projection = entry.load()()
        found[projection.name] = projection
    return found


async def _read_batch(conn: AsyncConnection[Any], after: int, limit: int,
                      until: int | None = None) -> list[tuple[int, Event]]:
    bound = "" if until is None else " AND position <= %(until)s"
    cursor = await conn.execute(
        "SELECT position, data::text FROM events WHERE position > %(after)s" + bound +
        " ORDER BY position LIMIT %(limit)s", {"after": after, "until": until, "limit": limit})
    return [(row[0], decode(row[1])) for row in await cursor.fetchall()]


async def _lock_checkpoint(conn: AsyncConnection[Any], name: str) -> int:
    """The checkpoint ``name``, its row locked until the transaction ends."""
    await conn.execute("INSERT INTO checkpoints (name, position) VALUES (%s, 0) "
                       "ON CONFLICT (name) DO NOTHING", (name,))
    cursor = await conn.execute(
        "SELECT position FROM checkpoints WHERE name = %s FOR UPDATE", (name,))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def catch_up(conn: AsyncConnection[Any], projection: Projection, *,
                   batch_size: int = 2000) -> int:
    """Apply every stored event past the projection's checkpoint; returns how many.

    For projections maintained outside the recorder: each batch commits with its checkpoint.
    Each batch locks the checkpoint's row first, so runners of the same projection (a
    service's instances) take turns: each reads where the last batch ended, and no event is
    applied twice nor the checkpoint moved back.
    """
    identity = {table: table for table in projection.tables}
    applied = 0
    while True:
        async with conn.transaction():
            after = await _lock_checkpoint(conn, projection.name)
            batch = await _read_batch(conn, after, batch_size)
            if not batch:
                return applied
            await projection.apply(conn, identity, batch)
            await set_checkpoint(conn, projection.name, batch[-1][0])
        applied += len(batch)


async def rebuild(conn: AsyncConnection[Any], projection: Projection, *,
                  batch_size: int = 5000, checkpoint: bool = False) -> RebuildReport:
    """Rebuild a projection from ``events`` into shadow tables, then swap them in.

    With ``checkpoint`` the projection's own checkpoint is set to the swapped-in position
    (projections kept by :func:`catch_up`); the recorder's inline projections have none.
    """
    started = time.perf_counter()
    shadows = {table: f"{table}__rebuild" for table in projection.tables}
    async with conn.transaction():
        for table, shadow in shadows.items():
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(shadow)))
            await conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                sql.Identifier(shadow), sql.Identifier(table)))
    position = count = 0
    while True:  # the bulk, in batches, while the recorder goes on writing
        async with conn.transaction():
            batch = await _read_batch(conn, position, batch_size)
            if not batch:
                break
            await projection.apply(conn, shadows, batch)
        position, count = batch[-1][0], count + len(batch)
    async with conn.transaction():  # the tail and the swap, with the recorder held off
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        while batch := await _read_batch(conn, position, batch_size):
            await projection.apply(conn, shadows, batch)
            position, count = batch[-1][0], count + len(batch)
        for table, shadow in shadows.items():
            old = sql.Identifier(f"{table}__old")
            await conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                sql.Identifier(table), old))
            await conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                sql.Identifier(shadow), sql.Identifier(table)))
            await conn.execute(sql.SQL("DROP TABLE {}").format(old))
        if checkpoint:
            await set_checkpoint(conn, projection.name, position)
    return RebuildReport(projection.name, count, position, time.perf_counter() - started)
