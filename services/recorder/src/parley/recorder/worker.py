"""The recorder: JetStream EVENTS → Postgres, exactly once, in stream order.

Postgres is the source of truth for progress. The recorder reads its checkpoint, pulls the
stream from checkpoint+1 through an ephemeral consumer, and writes each batch — event rows
(COPY), the inline projections and the new checkpoint — in one transaction. Nothing is acked
to JetStream: a crash anywhere simply restarts from the committed checkpoint, so no position is
written twice and none is skipped. Positions that cannot become events (undecodable payloads,
duplicate ids republished after the dedupe window, messages expired before they were recorded)
go to ``dead_letters`` with the reason, so every stream sequence is accounted for.

Only one recorder writes at a time (a session advisory lock); others wait as hot standbys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError, NotFoundError

from parley.common.bus import EVENTS_STREAM, Bus
from parley.common.events import Event, EventDecodeError, decode
from parley.common.metrics import Metrics
from parley.common.store import WRITE_LOCK, Projection, append, event_row, get_checkpoint
from parley.common.store import set_checkpoint as store_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT = "recorder"
LEADER_LOCK = 0x7265636F7264  # "record"


class Recorder:
    """Copies EVENTS into the event store and keeps the inline projections."""

    def __init__(self, bus: Bus, database_url: str, projections: Sequence[Projection], *,
                 metrics: Metrics, batch_size: int = 1000, crash_point: str = "",
                 crash_after_batches: int = 0) -> None:
        self.bus = bus
        self.database_url = database_url
        self.projections = list(projections)
        self.batch_size = batch_size
        self.position = 0
        self.leader = False
        # Chaos-test hook: SIGKILL this process at a named point of the Nth batch.
        self._crash_point = crash_point
        self._crash_after = crash_after_batches
        self._batches = 0
        self._recorded = metrics.counter("recorder_events",
                                         "Events written to the event store")
        self._dead = metrics.counter("recorder_dead_letters",
                                     "Stream positions recorded as dead letters", ["reason"])
        self._batch_seconds = metrics.histogram("recorder_batch_seconds",
                                                "Time to write one batch")
        self._lag = metrics.gauge("recorder_lag_events",
                                  "Stream messages not yet recorded")

    async def run(self, stop: asyncio.Event) -> None:
        """Record until ``stop`` is set; survives NATS and Postgres outages by retrying."""
        async with await psycopg.AsyncConnection.connect(self.database_url,
                                                         autocommit=True) as leader_conn:
            while not stop.is_set() and not await self._try_lead(leader_conn):
                await _wait(stop, 1.0)
            if stop.is_set():
                return
            self.leader = True
            log.info("recorder is the leader")
            while not stop.is_set():
                try:
                    async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
                        await self._record(conn, stop)
                except (psycopg.OperationalError, NotFoundError, NatsTimeoutError) as exc:
                    log.warning("recorder interrupted (%s); resuming from checkpoint", exc)
                    await _wait(stop, 0.5)

    async def _try_lead(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def _record(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        self.position = await get_checkpoint(conn, CHECKPOINT)
        await conn.commit()
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.position + 1, inactive_threshold=60.0, mem_storage=True,
            max_waiting=1,
        )
        sub = await self.bus.js.pull_subscribe("parley.ev.>", stream=EVENTS_STREAM, config=config)
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=0.2)
                except (TimeoutError, FetchTimeoutError, NatsTimeoutError):
                    self._lag.set(0)
                    continue
                if not msgs:
                    continue
                await self._write_batch(conn, msgs)
                self._lag.set(msgs[-1].metadata.num_pending)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _write_batch(self, conn: psycopg.AsyncConnection[Any], msgs: list[Msg]) -> None:
        started = time.perf_counter()
        good: list[tuple[int, Event, str | None]] = []
        dead: list[tuple[int, str, str, bytes | None]] = []
        expected = self.position + 1
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if seq < expected:
                continue  # already recorded (a stale delivery)
            dead.extend((missing, "", "missing from stream: expired or deleted before "
                         "it was recorded", None) for missing in range(expected, seq))
            expected = seq + 1
            try:
                event = decode(msg.data)
            except EventDecodeError as exc:
                dead.append((seq, msg.subject, f"undecodable: {exc}", msg.data))
                continue
            good.append((seq, event, (msg.headers or {}).get("traceparent")))
        if expected == self.position + 1:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            good = await self._drop_duplicates(conn, good, dead)
            async with conn.cursor() as cursor:
                await append(cursor, [event_row(p, e, t) for p, e, t in good])
                if dead:
                    await cursor.executemany(
                        "INSERT INTO dead_letters (position, subject, reason, payload) "
                        "VALUES (%s, %s, %s, %s)", dead)
            self._maybe_crash("after_insert")
            batch = [(p, e) for p, e, _ in good]
            for projection in self.projections:
                await projection.apply(conn, {t: t for t in projection.tables}, batch)
            await store_checkpoint(conn, CHECKPOINT, expected - 1)
        self._maybe_crash("after_commit")
        self.position = expected - 1
        self._batches += 1
        self._recorded.inc(len(good))
        for _, _, reason, _ in dead:
            self._dead.labels(reason.split(":", 1)[0]).inc()
            log.error("dead letter at position: %s", reason)
        self._batch_seconds.observe(time.perf_counter() - started)

    async def _drop_duplicates(self, conn: psycopg.AsyncConnection[Any],
                               good: list[tuple[int, Event, str | None]],
                               dead: list[tuple[int, str, str, bytes | None]],
                               ) -> list[tuple[int, Event, str | None]]:
        """Event ids already stored (republished after JetStream's dedupe window)."""
        cursor = await conn.execute(
            "SELECT event_id, position FROM events WHERE event_id = ANY(%s)",
            ([e.id for _, e, _ in good],))
        stored = {row[0]: row[1] for row in await cursor.fetchall()}
        kept = []
        for position, event, trace in good:
            if event.id in stored:
                dead.append((position, "", f"duplicate: event {event.id} already at position "
                             f"{stored[event.id]}", None))
                continue
            stored[event.id] = position
            kept.append((position, event, trace))
        return kept

    def _maybe_crash(self, point: str) -> None:
        if self._crash_point == point and self._batches + 1 >= self._crash_after:
            log.warning("chaos: killing the recorder at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
