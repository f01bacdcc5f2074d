"""The recorder: JetStream EVENTS → Postgres, exactly once, in stream order.

Postgres is the source of truth for progress. The recorder reads its checkpoint, pulls the
stream from checkpoint+1 through an ephemeral consumer, and writes each batch — event rows
(COPY), the inline projections and the new checkpoint — in one transaction. Nothing is acked
to JetStream: a crash anywhere simply restarts from the committed checkpoint, so no position is
written twice and none is skipped; a lost consumer (a NATS restart, the consumer expired) is
replaced the same way, and so is a message lost in transit (a connection dropped while it was
delivered), which the stream still holds. Positions that cannot become events (undecodable
payloads, events on a subject not their own, duplicate ids republished after the dedupe window,
messages expired or deleted before they were recorded) go to ``dead_letters`` with the reason,
so every stream sequence is accounted for.

A stream deleted and created again numbers its messages from 1 again: the recorder tells streams
apart by their created time (``recorder_streams``) and stores a new one's messages after what it
had recorded, from its first, at its sequence plus an offset.

Only one recorder writes at a time (a session advisory lock); others wait as hot standbys. A
leader whose lock connection drops goes back to waiting for the lock; each batch locks the
checkpoint row and is dropped if another recorder moved it, so a deposed leader never writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import APIError, NotFoundError

from parley.common.bus import EVENTS_STREAM, Bus, event_subject
from parley.common.events import Event, EventDecodeError, decode
from parley.common.metrics import Metrics
from parley.common.store import WRITE_LOCK, Projection, append, event_row, get_checkpoint
from parley.common.store import set_checkpoint as store_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT = "recorder"
LEADER_LOCK = 0x7265636F7264  # "record"
RETRY_MIN_S, RETRY_MAX_S = 0.5, 8.0
GAP_CHUNK = 10_000  # skipped positions dead-lettered per transaction
LEAD_CHECK_S = 1.0  # how often a leader checks that its lock's connection is alive
LEAD_CHECK_TIMEOUT_S = 2.0  # a lock connection silent this long is lost
# A Postgres that stops answering (a network blackhole, a hung server) is noticed in seconds,
# not after the OS defaults (minutes of retransmission, two hours before a keepalive): by the
# recorder (libpq's connect timeout and TCP keepalives, and a bound on unacknowledged data),
# and by the server, which then ends the session and frees the leader lock for a standby.
_CLIENT_TCP: dict[str, Any] = {
    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
    "keepalives_count": 3, "tcp_user_timeout": 10_000}
_SERVER_TCP = ("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; "
               "SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000")
# The JSON escape of NUL (backslash, u0000), which jsonb refuses. Only after an even number of
# backslashes: after an odd number it is an escaped backslash followed by the text "u0000".
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class LeadershipLost(Exception):
    """The recorder no longer holds the leader lock, or another one wrote past it."""


class MessageLost(Exception):
    """A position the stream still holds never reached the recorder (lost in transit)."""


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
        self.offset = 0  # the stream read now: its sequence s is stored at position offset + s
        self._stream_created: datetime | None = None  # the stream the offset is for
        self.leader = False
        self.standing_by = False  # connected, waiting for the leader lock another instance has
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
        self._leading = metrics.gauge("recorder_leader",
                                      "1 while this instance records, 0 while it stands by")
        self._recreated = metrics.counter(
            "recorder_streams_recreated",
            "EVENTS streams found deleted and created again, recorded from their first message")

    @property
    def ready(self) -> bool:
        """Leading, or able to take over: a standby is ready (a rollout waits for it)."""
        return self.leader or self.standing_by

    async def run(self, stop: asyncio.Event) -> None:
        """Record until ``stop`` is set; survives NATS and Postgres outages by retrying."""
        while not stop.is_set():
            try:
                async with _connect(self.database_url, autocommit=True) as leader_conn:
                    await self._lead(leader_conn, stop)
            except (psycopg.OperationalError, LeadershipLost) as exc:
                log.warning("recorder is not the leader any more (%s); trying again", exc)
                await _wait(stop, 1.0)
            finally:
                self.leader = self.standing_by = False
                self._leading.set(0)

    async def _lead(self, leader_conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Wait for the leader lock on ``leader_conn``, then record while it holds it."""
        while not stop.is_set() and not await self._try_lead(leader_conn):
            self.standing_by = True
            await _wait(stop, 1.0)
        if stop.is_set():
            return
        self.leader, self.standing_by = True, False
        self._leading.set(1)
        log.info("recorder is the leader")
        delay, failed_at = RETRY_MIN_S, -math.inf
        while not stop.is_set():
            try:
                async with _connect(self.database_url) as conn:
                    await self._record(conn, leader_conn, stop)
            except (psycopg.OperationalError, APIError, NatsTimeoutError, MessageLost) as exc:
                # Any JetStream API error (404 consumer gone, 503 no responders, 500, a 400
                # such as the stream's consumer limit reached) is retried here, not fatal.
                # Back off while failures follow each other (NATS still restarting, the
                # consumer lost again at once); an isolated failure is retried quickly.
                now = time.monotonic()
                delay = RETRY_MIN_S if now - failed_at > 60 else min(delay * 2, RETRY_MAX_S)
                failed_at = now
                log.warning("recorder interrupted (%s); resuming from checkpoint in %.1f s",
                            exc, delay)
                await _wait(stop, delay)

    async def _try_lead(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def _check_lead(self, leader_conn: psycopg.AsyncConnection[Any]) -> None:
        """Raise ``LeadershipLost`` if the session holding the leader lock is gone or silent.

        Its lock went with it (or will, once the server's keepalives give up on this
        recorder), so a standby may be leading already.
        """
        try:
            async with asyncio.timeout(LEAD_CHECK_TIMEOUT_S):
                await leader_conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise LeadershipLost(f"the leader lock's connection failed: {exc}") from exc
        except TimeoutError as exc:
            raise LeadershipLost(f"the leader lock's connection did not answer in "
                                 f"{LEAD_CHECK_TIMEOUT_S} s") from exc

    async def _record(self, conn: psycopg.AsyncConnection[Any],
                      leader_conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        await self._check_lead(leader_conn)
        # The row each batch locks to fence out a deposed leader (see _write_batch).
        await conn.execute("INSERT INTO checkpoints (name, position) VALUES (%s, 0) "
                           "ON CONFLICT (name) DO NOTHING", (CHECKPOINT,))
        self.position = await get_checkpoint(conn, CHECKPOINT)
        await conn.commit()
        await self._find_stream(conn)
        puller = _BatchPuller(self.bus, start_seq=self.position + 1 - self.offset,
                              batch=self.batch_size)
        await puller.start()
        next_lead_check = time.monotonic() + LEAD_CHECK_S
        try:
            # Created again between _find_stream and the consumer: the consumer reads another.
            self._check_stream(await self.bus.js.stream_info(EVENTS_STREAM))
            batch = await puller.next_batch()
            while not stop.is_set():
                if time.monotonic() >= next_lead_check:
                    await self._check_lead(leader_conn)
                    next_lead_check = time.monotonic() + LEAD_CHECK_S
                puller.request()  # the next batch streams in while this one is written
                if batch:
                    await self._write_batch(conn, batch)
                    self._lag.set(_pending(batch[-1]))
                else:
                    self._lag.set(0)
                batch = await puller.wait()
        finally:
            await puller.stop()

    async def _find_stream(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Set the offset of the EVENTS stream there is now; record it if it is a new one.

        A stream deleted and created again numbers its messages from its first sequence again:
        it is read from there, stored after the checkpoint. It is told by a created time other
        than the one recorded, or by a last sequence below what was recorded from the stream
        (which only a replaced stream shows: one restored from an older backup, or one recreated
        before streams were recorded). Messages it shares with the old stream (republished,
        restored) are stored once: the copies are duplicates by event id.
        """
        info = await self.bus.js.stream_info(EVENTS_STREAM)
        async with conn.transaction():
            cursor = await conn.execute(
                "SELECT created, sequence_offset FROM recorder_streams "
                "ORDER BY since_position DESC LIMIT 1")
            known = await cursor.fetchone()
            known_offset = known[1] if known else 0
            # Another stream than the one recorded, or one that went backwards (replaced).
            recreated = ((known is not None and known[0] != info.created)
                         or self.position - known_offset > info.state.last_seq)
            if known is not None and not recreated:
                self.offset, self._stream_created = known_offset, info.created
                return
            offset = self.position - (info.config.first_seq or 1) + 1 if recreated else 0
            await self._fence(conn)
            await conn.execute(
                "INSERT INTO recorder_streams (since_position, created, sequence_offset) "
                "VALUES (%s, %s, %s) ON CONFLICT (since_position) DO UPDATE SET "
                "created = excluded.created, sequence_offset = excluded.sequence_offset, "
                "found_at = now()", (self.position, info.created, offset))
        self.offset, self._stream_created = offset, info.created
        if recreated:
            self._recreated.inc()
            log.error("EVENTS was deleted and created again (created %s, last sequence %d; "
                      "recorded up to position %d): recording it from its first message, "
                      "sequence s at position %d + s; whatever the old stream held past "
                      "position %d went with it", info.created, info.state.last_seq,
                      self.position, offset, self.position)

    def _check_stream(self, info: StreamInfo) -> None:
        """Raise ``NotFoundError`` if EVENTS is not the stream the offset was found for."""
        if info.created != self._stream_created:
            raise NotFoundError(description="EVENTS was created again while it was read")

    async def _write_batch(self, conn: psycopg.AsyncConnection[Any], msgs: list[Msg]) -> None:
        started = time.perf_counter()
        good: list[tuple[int, Event, bytes, str | None]] = []
        dead: list[tuple[int, str, str, bytes | None]] = []
        expected = self.position + 1
        for msg in msgs:
            seq = self.offset + _stream_sequence(msg)  # the store position
            if seq < expected:
                continue  # already recorded (a stale delivery)
            if seq > expected:  # what came before the gap, then the gap in its own chunks
                await self._commit(conn, good, dead, expected - 1)
                good, dead = [], []
                await self._write_gap(conn, seq)
            expected = seq + 1
            try:
                event = decode(msg.data)
            except EventDecodeError as exc:
                dead.append((seq, msg.subject, f"undecodable: {exc}", msg.data))
                continue
            if msg.subject != (own_subject := event_subject(event)):
                # Tenancy is in the subject: who may publish for one org must not write
                # another's history, and the stream and the store must agree on each event.
                dead.append((seq, msg.subject, f"mismatched subject: the event's own is "
                             f"{own_subject}", msg.data))
                continue
            if b"\\u0000" in msg.data and _NUL_ESCAPE.search(msg.data):
                dead.append((seq, msg.subject, "unstorable: a NUL character, which Postgres "
                             "jsonb refuses", msg.data))
                continue
            good.append((seq, event, msg.data, (msg.headers or {}).get("traceparent")))
        if expected == self.position + 1:
            return
        await self._commit(conn, good, dead, expected - 1)
        self._batch_seconds.observe(time.perf_counter() - started)

    async def _write_gap(self, conn: psycopg.AsyncConnection[Any], end: int) -> None:
        """Dead-letter the skipped positions before ``end``, ``GAP_CHUNK`` per transaction.

        A recorder down longer than the stream's max age (or a purge) can face millions; the
        checkpoint moves with each chunk.
        """
        while self.position + 1 < end:
            chunk_end = min(end, self.position + 1 + GAP_CHUNK)
            dead = await self._missing(self.position + 1, chunk_end)
            await self._commit(conn, [], dead, chunk_end - 1)

    async def _commit(self, conn: psycopg.AsyncConnection[Any],
                      good: list[tuple[int, Event, bytes, str | None]],
                      dead: list[tuple[int, str, str, bytes | None]], position: int) -> None:
        """Write the events and dead letters up to ``position`` and move the checkpoint there.

        An event Postgres refuses although it decoded (bytes that are not UTF-8 in a field this
        version skips unread, a number beyond its column) would fail every retry of the batch
        and hold the stream: the batch is written again one position at a time, and that event
        becomes a dead letter with Postgres's reason.
        """
        try:
            await self._commit_once(conn, good, dead, position)
        except (psycopg.DataError, UnicodeDecodeError):
            if not good:
                raise  # dead letters are bytes and text Postgres takes: not an event's fault
            log.warning("Postgres refused a row of positions %d to %d; writing them one by "
                        "one", self.position + 1, position)
            await self._commit_one_by_one(conn, good, dead, position)

    async def _commit_one_by_one(self, conn: psycopg.AsyncConnection[Any],
                                 good: list[tuple[int, Event, bytes, str | None]],
                                 dead: list[tuple[int, str, str, bytes | None]],
                                 position: int) -> None:
        events = {item[0]: item for item in good}
        letters = {item[0]: item for item in dead}
        for at in range(self.position + 1, position + 1):
            if at in letters:
                await self._commit_once(conn, [], [letters[at]], at)
                continue
            _, event, raw, _ = item = events[at]
            try:
                await self._commit_once(conn, [item], [], at)
            except (psycopg.DataError, UnicodeDecodeError) as exc:
                reason = f"unstorable: {str(exc).splitlines()[0]}"
                await self._commit_once(conn, [], [(at, event_subject(event), reason, raw)], at)

    async def _commit_once(self, conn: psycopg.AsyncConnection[Any],
                           good: list[tuple[int, Event, bytes, str | None]],
                           dead: list[tuple[int, str, str, bytes | None]],
                           position: int) -> None:
        """One transaction: the rows, the projections and the checkpoint."""
        if position == self.position:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            await self._fence(conn)
            if good:
                good, dead = await self._drop_duplicates(conn, good, dead)
            async with conn.cursor() as cursor:
                await append(cursor, [event_row(p, e, t, raw) for p, e, raw, t in good])
                if dead:
                    async with cursor.copy("COPY dead_letters (position, subject, reason, "
                                           "payload) FROM STDIN") as copy:
                        for at, subject, reason, payload in dead:
                            # A decode error can quote the bad value, NUL included.
                            await copy.write_row((at, subject, reason.replace("\x00", "\\0"),
                                                  payload))
            self._maybe_crash("after_insert")
            batch = [(p, e) for p, e, _, _ in good]
            for projection in self.projections:
                await projection.apply(conn, {t: t for t in projection.tables}, batch)
            await store_checkpoint(conn, CHECKPOINT, position)
        self._maybe_crash("after_commit")
        self.position = position
        self._batches += 1
        self._recorded.inc(len(good))
        reasons = Counter(reason for _, _, reason, _ in dead)
        for reason, count in reasons.items():
            self._dead.labels(reason.split(":", 1)[0]).inc(count)
        if len(dead) <= 10:
            for at, _, reason, _ in dead:
                log.error("dead letter at position %d: %s", at, reason)
        else:  # a gap: a line per reason, not per position
            for reason, count in reasons.items():
                log.error("%d dead letters at positions %d to %d: %s", count,
                          min(at for at, _, r, _ in dead if r == reason),
                          max(at for at, _, r, _ in dead if r == reason), reason)

    async def _missing(self, start: int, end: int) -> list[tuple[int, str, str, bytes | None]]:
        """Dead letters for the positions ``start``..``end - 1`` that the consumer skipped.

        Below the stream's first sequence they expired (or were purged); above it, a position
        the stream no longer has was deleted. One it still has was lost in transit (a
        connection dropped while it was delivered): raise ``MessageLost`` to pull again from
        the checkpoint.
        """
        info = await self.bus.js.stream_info(EVENTS_STREAM)
        self._check_stream(info)
        first = self.offset + info.state.first_seq
        dead: list[tuple[int, str, str, bytes | None]] = [
            (position, "", "missing from stream: expired or purged before it was recorded",
             None) for position in range(start, min(end, first))]
        for position in range(max(start, first), end):
            try:
                await self.bus.js.get_msg(EVENTS_STREAM, position - self.offset)
            except NotFoundError:
                dead.append((position, "", "missing from stream: deleted before it was "
                             "recorded", None))
                continue
            raise MessageLost(f"position {position} is in the stream but was not delivered")
        return dead

    async def _fence(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Lock the checkpoint row; raise ``LeadershipLost`` if another recorder moved it.

        The leader lock alone cannot stop a leader that lost it (its lock connection dropped)
        from finishing the batches it already pulled, while a standby took over.
        """
        cursor = await conn.execute(
            "SELECT position FROM checkpoints WHERE name = %s FOR UPDATE", (CHECKPOINT,))
        row = await cursor.fetchone()
        if row is None or row[0] != self.position:
            raise LeadershipLost(f"another recorder moved the checkpoint to "
                                 f"{row[0] if row else None}, from {self.position}")

    async def _drop_duplicates(self, conn: psycopg.AsyncConnection[Any],
                               good: list[tuple[int, Event, bytes, str | None]],
                               dead: list[tuple[int, str, str, bytes | None]],
                               ) -> tuple[list[tuple[int, Event, bytes, str | None]],
                                          list[tuple[int, str, str, bytes | None]]]:
        """The events to write and the dead letters, once ids already stored are moved over.

        Such an id was republished after JetStream's dedupe window. The lists given are left
        as they were, so a batch written again one by one starts from the same ones.
        """
        cursor = await conn.execute(
            "SELECT event_id, position FROM events WHERE event_id = ANY(%s)",
            ([e.id for _, e, _, _ in good],))
        stored = {row[0]: row[1] for row in await cursor.fetchall()}
        kept, dead = [], list(dead)
        for position, event, raw, trace in good:
            if event.id in stored:
                dead.append((position, "", f"duplicate: event {event.id} already at position "
                             f"{stored[event.id]}", None))
                continue
            stored[event.id] = position
            kept.append((position, event, raw, trace))
        return kept, dead

    def _maybe_crash(self, point: str) -> None:
        if self._crash_point == point and self._batches + 1 >= self._crash_after:
            log.warning("chaos: killing the recorder at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.asynccontextmanager
async def _connect(database_url: str, *, autocommit: bool = False,
                   ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection to the event store that notices, and lets the server notice, a dead peer."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=autocommit,
                                                     **_CLIENT_TCP) as conn:
        # Set per session rather than in the startup packet's options, which poolers refuse.
        await conn.execute(_SERVER_TCP)
        await conn.commit()
        yield conn


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _BatchPuller:
    """Pulls EVENTS in order through an ephemeral, ack-less consumer, one batch at a time.

    A hand-rolled pull (one ``CONSUMER.MSG.NEXT`` request per batch, replies collected by a
    subscription callback) because nats-py's ``fetch`` spends ~25 µs of Python per message;
    this keeps the recorder's reading cost a few µs per event and lets the next batch arrive
    while the current one is written.
    """

    def __init__(self, bus: Bus, *, start_seq: int, batch: int, expires_s: float = 0.25) -> None:
        self.bus = bus
        self.start_seq = start_seq
        self.batch = batch
        self.expires_ns = int(expires_s * 1e9)
        self._buffer: list[Msg] = []
        self._done = asyncio.Event()
        self._lost = ""
        self._name = f"recorder-{uuid.uuid4().hex[:12]}"
        self._inbox = bus.nc.new_inbox()

    async def start(self) -> None:
        """Create the consumer and the reply subscription."""
        await self.bus.js.add_consumer(EVENTS_STREAM, ConsumerConfig(
            name=self._name, filter_subject="parley.ev.>", ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start_seq,
            inactive_threshold=60.0, mem_storage=True, max_waiting=1))
        self._sub = await self.bus.nc.subscribe(self._inbox, cb=self._on_message,
                                                pending_msgs_limit=4 * self.batch + 16)
        self.request()

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            if status not in ("404", "408"):  # not "no messages" or "request expired"
                # 409 consumer deleted (inactive_threshold passed during a long write), 503 no
                # responders (the server restarted without this in-memory consumer), ...: no
                # later request can succeed either.
                self._lost = f"{status} {msg.headers.get('Description', '')}".strip()
            self._done.set()  # this request is over
            return
        self._buffer.append(msg)
        if len(self._buffer) >= self.batch:
            self._done.set()

    def request(self) -> None:
        """Ask for the next batch (replies land in the buffer)."""
        self._done.clear()
        payload = json.dumps({"batch": self.batch, "expires": self.expires_ns}).encode()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{self._name}"
        self._pending_request = asyncio.ensure_future(
            self.bus.nc.publish(subject, payload, reply=self._inbox))

    async def wait(self) -> list[Msg]:
        """The batch requested last (possibly empty after the request expired).

        Raises ``NotFoundError`` once the consumer is gone: the caller resumes from its
        checkpoint with a new one.
        """
        await self._pending_request
        try:
            await asyncio.wait_for(self._done.wait(), self.expires_ns / 1e9 + 5)
        except TimeoutError as exc:  # the server never answered: treat as a lost consumer
            raise NotFoundError(description="no answer to a pull request") from exc
        if self._lost:
            raise NotFoundError(description=f"pull consumer lost: {self._lost}")
        batch, self._buffer = self._buffer, []
        return batch

    async def next_batch(self) -> list[Msg]:
        """Wait for the batch requested by ``start``."""
        return await self.wait()

    async def stop(self) -> None:
        """Unsubscribe and delete the consumer."""
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.bus.js.delete_consumer(EVENTS_STREAM, self._name)


def _reply_tokens(msg: Msg) -> list[str]:
    return (msg.reply or "").split(".")


def _stream_sequence(msg: Msg) -> int:
    """The stream sequence from the ack subject, without nats-py's full metadata parse.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`` (9 tokens), or the
    v2 form with domain and account hash after ``$JS.ACK`` (12+ tokens).
    """
    tokens = _reply_tokens(msg)
    if len(tokens) == 9:
        return int(tokens[5])
    if len(tokens) >= 12:
        return int(tokens[7])
    return int(msg.metadata.sequence.stream)


def _pending(msg: Msg) -> int:
    tokens = _reply_tokens(msg)
    if len(tokens) == 9:
        return int(tokens[8])
    if len(tokens) >= 12:
        return int(tokens[10])
    return int(msg.metadata.num_pending)
