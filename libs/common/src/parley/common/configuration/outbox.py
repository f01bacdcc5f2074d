"""The transactional outbox: config events written with the change, published afterwards.

``emit`` inserts the encoded event in the caller's transaction, so the change and its event
commit together or not at all. ``OutboxRelay.publish_pending`` publishes unpublished rows in
order; ``Nats-Msg-Id`` = event id makes a re-publish after a crash harmless. A row that can never
be published (not an event, or ids NATS refuses in a subject) is marked failed with the reason
and logged, so it does not hold back the rows after it.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.errors import BadSubjectError, MaxPayloadError
from psycopg import AsyncConnection

from ..bus import Bus
from ..bus.subjects import SubjectError
from ..events import Event, EventDecodeError, decode, encode

log = logging.getLogger(__name__)

# Failures that publishing the same row again cannot cure; anything else (NATS down, no ack)
# leaves the row pending for the next run.
UNPUBLISHABLE = (EventDecodeError, SubjectError, BadSubjectError, MaxPayloadError)


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
        """Publish pending rows in commit order; returns how many were published.

        A row that can never be published is marked failed (``failed_at``, ``failure``) and
        logged, and the rows after it are published all the same.
        """
        published = 0
        while True:
            async with self.conn.transaction():
                cursor = await self.conn.execute(
                    "SELECT id, payload FROM outbox WHERE published_at IS NULL "
                    "AND failed_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
                rows = await cursor.fetchall()
                for row_id, payload in rows:
                    try:
                        await self.bus.publish(decode(bytes(payload)))
                    except UNPUBLISHABLE as exc:
                        log.error("outbox row %d can never be published, set aside: %r",
                                  row_id, exc)
                        await self.conn.execute(
                            "UPDATE outbox SET failed_at = now(), failure = %s WHERE id = %s",
                            (repr(exc), row_id))
                        continue
                    published += 1
                    await self.conn.execute(
                        "UPDATE outbox SET published_at = now() WHERE id = %s", (row_id,))
            if len(rows) < limit:
                return published
