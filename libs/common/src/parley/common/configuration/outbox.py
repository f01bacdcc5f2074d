"""The transactional outbox: config events written with the change, published afterwards.

``emit`` inserts the encoded event in the caller's transaction, so the change and its event
commit together or not at all. ``OutboxRelay.publish_pending`` publishes unpublished rows in
order; ``Nats-Msg-Id`` = event id makes a re-publish after a crash harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection

from ..bus import Bus
from ..events import Event, decode, encode

log = logging.getLogger(__name__)


async def emit(conn: AsyncConnection[Any], event: Event) -> None:
    """Queue a config event inside the caller's transaction."""
    await conn.execute("INSERT INTO outbox (event_id, payload) VALUES (%s, %s)",
                       (event.id, encode(event)))


class OutboxRelay:
    """Moves committed outbox rows onto the bus."""

    def __init__(self, bus: Bus, conn: AsyncConnection[Any]) -> None:
        self.bus = bus
        self.conn = conn

    async def publish_pending(self, *, limit: int = 500) -> int:
        """Publish pending rows in commit order; returns how many were published."""
        published = 0
        while True:
            async with self.conn.transaction():
                cursor = await self.conn.execute(
                    "SELECT id, payload FROM outbox WHERE published_at IS NULL ORDER BY id "
                    "LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
                rows = await cursor.fetchall()
                for row_id, payload in rows:
                    await self.bus.publish(decode(bytes(payload)))
                    await self.conn.execute(
                        "UPDATE outbox SET published_at = now() WHERE id = %s", (row_id,))
            published += len(rows)
            if len(rows) < limit:
                return published
