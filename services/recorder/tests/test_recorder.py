import asyncio
import contextlib

import psycopg
import pytest

from parley.common import events as ev
from parley.common.bus import EVENTS_STREAM, Bus
from parley.common.metrics import Metrics
from parley.common.store import rebuild
from parley.devkit.infra import NatsServer
from parley.recorder.projections import AuditLogProjection, CallsProjection
from parley.recorder.worker import CHECKPOINT, LEADER_LOCK, Recorder

from .conftest import wait_for


def call_script(call_id: str, org: str = "o1") -> list[ev.Event]:
    return [
        ev.CallRequested(org_id=org, call_id=call_id, direction="inbound", agent_id="a1",
                         from_number="+15550001", to_number="+15550002"),
        ev.CallRinging(org_id=org, call_id=call_id),
        ev.CallAnswered(org_id=org, call_id=call_id),
        ev.TranscriptFinal(org_id=org, call_id=call_id, text="hello"),
        ev.TurnUserEnded(org_id=org, call_id=call_id, turn_id="t1", text="hello"),
        ev.AgentSay(org_id=org, call_id=call_id, turn_id="t1", seq=0, text="Hi!", last=True),
        ev.CallEnded(org_id=org, call_id=call_id, reason="caller_hangup", duration_s=12.5),
    ]


@contextlib.asynccontextmanager
async def running_recorder(bus: Bus, database_url: str, *, metrics: Metrics | None = None,
                           **kwargs):
    recorder = Recorder(bus, database_url, [CallsProjection(), AuditLogProjection()],
                        metrics=metrics or Metrics("recorder"), **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        yield recorder
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def checkpoint(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT position FROM checkpoints WHERE name = %s",
                                 (CHECKPOINT,))
        row = await cur.fetchone()
        return row[0] if row else 0


def rows(database_url: str, query: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query).fetchall()


async def test_records_every_event_in_stream_order_with_projections(
        bus: Bus, database_url: str) -> None:
    published = []
    for i in range(30):
        for event in call_script(f"c{i}"):
            await bus.publish(event)
            published.append(event)
    await bus.publish(ev.AgentCreated(org_id="o1", agent_id="a1", name="Reception",
                                      actor="user:ann"))
    async with running_recorder(bus, database_url, batch_size=50):
        await wait_for(lambda: checkpoint(database_url), timeout=15)
        await wait_for(lambda: _at(database_url, len(published) + 1))

    stored = rows(database_url, "SELECT position, event_id FROM events ORDER BY position")
    assert [p for p, _ in stored] == list(range(1, len(published) + 2))
    assert [i for _, i in stored[:-1]] == [e.id for e in published]
    calls = rows(database_url, "SELECT call_id, state, turns, duration_s, end_reason, "
                               "event_count FROM calls WHERE call_id = 'c7'")
    assert calls == [("c7", "ended", 1, 12.5, "caller_hangup", 7)]
    assert rows(database_url, "SELECT count(*) FROM calls") == [(30,)]
    audit = rows(database_url, "SELECT type, actor FROM audit_log WHERE aggregate = 'agent'")
    assert audit == [("agent.created", "user:ann")]
    assert rows(database_url, "SELECT count(*) FROM audit_log WHERE type = 'call.requested'") \
        == [(30,)]


async def _at(database_url: str, position: int) -> bool:
    return await checkpoint(database_url) >= position


async def test_poison_and_late_duplicates_become_dead_letters_not_gaps(
        bus: Bus, database_url: str) -> None:
    first = ev.CallRinging(org_id="o1", call_id="c1")
    await bus.publish(first)
    await bus.js.publish("parley.ev.o1.call.c1.call.ringing", b'{"type":"call.ringing"}')
    # The same event id again without Nats-Msg-Id: what a republish after the window looks like.
    await bus.js.publish("parley.ev.o1.call.c1.call.ringing", ev.encode(first))
    await bus.publish(ev.CallEnded(org_id="o1", call_id="c1"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 4))
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(1,), (4,)]
    dead = rows(database_url, "SELECT position, reason FROM dead_letters ORDER BY 1")
    assert dead[0][0] == 2 and "undecodable" in dead[0][1] and "org_id" in dead[0][1]
    assert dead[1][0] == 3 and dead[1][1].startswith("duplicate") and "position 1" in dead[1][1]
    assert rows(database_url, "SELECT state FROM calls") == [("ended",)]


async def test_resumes_from_its_checkpoint_without_rewriting(bus: Bus, database_url: str) -> None:
    for event in call_script("c1"):
        await bus.publish(event)
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 7))
    for event in call_script("c2"):
        await bus.publish(event)
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 14))
    assert rows(database_url, "SELECT count(*), min(position), max(position) FROM events") == \
        [(14, 1, 14)]


async def test_only_one_recorder_writes_at_a_time(bus: Bus, database_url: str) -> None:
    async with running_recorder(bus, database_url) as leader:
        await wait_for(lambda: leader.leader)
        async with running_recorder(bus, database_url) as standby:
            await asyncio.sleep(0.5)
            assert not standby.leader
            await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
            await wait_for(lambda: _at(database_url, 1))


async def test_a_rebuilt_projection_equals_the_live_one(bus: Bus, database_url: str) -> None:
    for i in range(40):
        for event in call_script(f"c{i}", org="o2" if i % 2 else "o1"):
            await bus.publish(event)
    await bus.publish(ev.ApiKeyCreated(org_id="o1", key_id="k1", actor="user:bo"))
    async with running_recorder(bus, database_url, batch_size=37):
        await wait_for(lambda: _at(database_url, 281))
        live_calls = rows(database_url, "SELECT * FROM calls ORDER BY call_id")
        live_audit = rows(database_url, "SELECT * FROM audit_log ORDER BY position")
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            report = await rebuild(conn, CallsProjection(), batch_size=50)
            await rebuild(conn, AuditLogProjection(), batch_size=50)
        assert report.events == 281 and report.position == 281
        # The live recorder keeps writing into the swapped-in table.
        for event in call_script("after-rebuild"):
            await bus.publish(event)
        await wait_for(lambda: _at(database_url, 288))
    assert rows(database_url, "SELECT * FROM calls WHERE call_id <> 'after-rebuild' "
                              "ORDER BY call_id") == live_calls
    assert rows(database_url, "SELECT * FROM audit_log WHERE position <= 281 "
                              "ORDER BY position") == live_audit
    assert rows(database_url, "SELECT state FROM calls WHERE call_id = 'after-rebuild'") == \
        [("ended",)]


def test_events_are_append_only(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO events (position, event_id, org_id, aggregate, aggregate_id, "
                     "type, v, at, data) VALUES (1, gen_random_uuid(), 'o', 'call', 'c', "
                     "'call.ringing', 1, now(), '{}')")
        conn.commit()
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE events SET org_id = 'other'")
        conn.rollback()
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM events")


async def test_text_postgres_cannot_store_is_a_dead_letter_not_a_stuck_recorder(
        bus: Bus, database_url: str) -> None:
    await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="bad \x00 byte"))
    await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="fine"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 2))
    assert rows(database_url, "SELECT position FROM events") == [(2,)]
    (dead,) = rows(database_url, "SELECT position, reason FROM dead_letters")
    assert dead[0] == 1 and "NUL" in dead[1]


async def test_text_with_a_backslash_before_u0000_is_stored_not_mistaken_for_nul(
        bus: Bus, database_url: str) -> None:
    # Stringified JSON in a tool result: a literal backslash then "u0000", which jsonb accepts.
    text = r'the API returned {"sep": "\u0000"}'
    await bus.publish(ev.ToolCompleted(org_id="o1", call_id="c1", tool_call_id="x",
                                       name="lookup", result={"body": text}))
    await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text="bad \\\x00 byte"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 2))
    assert rows(database_url, "SELECT position FROM events") == [(1,)]
    assert rows(database_url, "SELECT data->'result'->>'body' FROM events") == [(text,)]
    (dead,) = rows(database_url, "SELECT position, reason FROM dead_letters")
    assert dead[0] == 2 and "NUL" in dead[1]


async def test_resumes_from_its_checkpoint_when_its_consumer_is_gone(
        bus: Bus, database_url: str) -> None:
    await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 1))
        # What inactive_threshold does to the ephemeral consumer after a long batch write.
        for consumer in await bus.js.consumers_info(EVENTS_STREAM):
            await bus.js.delete_consumer(EVENTS_STREAM, consumer.name)
        await bus.publish(ev.CallAnswered(org_id="o1", call_id="c1"))
        await bus.publish(ev.CallEnded(org_id="o1", call_id="c1"))
        await wait_for(lambda: _at(database_url, 3))
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(1,), (2,), (3,)]
    assert rows(database_url, "SELECT state FROM calls") == [("ended",)]


async def test_resumes_after_the_nats_server_restarts(tmp_path, database_url: str) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        bus = await Bus.connect(server.url, name="test")
        await bus.ensure_streams()
        try:
            await bus.publish(ev.CallRinging(org_id="o1", call_id="c1"))
            async with running_recorder(bus, database_url):
                await wait_for(lambda: _at(database_url, 1))
                server.stop()  # the in-memory ephemeral consumer goes with it
                await wait_for(lambda: not bus.nc.is_connected)
                server.start()
                await wait_for(lambda: bus.nc.is_connected)
                await bus.publish(ev.CallAnswered(org_id="o1", call_id="c1"))
                await bus.publish(ev.CallEnded(org_id="o1", call_id="c1"))
                await wait_for(lambda: _at(database_url, 3), timeout=20)
        finally:
            await bus.close()
    finally:
        server.stop()
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(1,), (2,), (3,)]


async def test_a_leader_that_lost_its_lock_connection_stops_writing(
        bus: Bus, database_url: str) -> None:
    async with running_recorder(bus, database_url, batch_size=3) as old:
        await wait_for(lambda: old.leader)
        async with running_recorder(bus, database_url, batch_size=3) as new:
            await asyncio.sleep(0.5)
            assert not new.leader
            # The leader's idle lock connection is dropped (a Postgres restart, a proxy's idle
            # timeout): its lock is released and the standby takes it.
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                             "locktype = 'advisory' AND objid = %s", (LEADER_LOCK & 0xFFFFFFFF,))
            await wait_for(lambda: new.leader)
            for i in range(40):
                await bus.publish(ev.TranscriptFinal(org_id="o1", call_id="c1", text=str(i)))
                await asyncio.sleep(0.02)
            await wait_for(lambda: _at(database_url, 40))
            await wait_for(lambda: not old.leader)
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == \
        [(p,) for p in range(1, 41)]
    assert rows(database_url, "SELECT position, reason FROM dead_letters") == []


async def test_an_event_postgres_refuses_is_a_dead_letter_not_a_stuck_recorder(
        bus: Bus, database_url: str) -> None:
    # Both decode (unknown fields are skipped unread, v is any int) but cannot be stored: bytes
    # that are not UTF-8 in a field this version does not know, and a v beyond Postgres's int.
    good = ev.encode(ev.CallRinging(org_id="o1", call_id="c1"))
    subject = "parley.ev.o1.call.c1.call.ringing"
    await bus.js.publish(subject, good[:-1] + b',"note":"caf\xe9"}')
    await bus.publish(ev.CallAnswered(org_id="o1", call_id="c1"))
    await bus.js.publish(subject, ev.encode(ev.CallRinging(org_id="o1", call_id="c1", v=2**40)))
    # And an undecodable one whose reason quotes a NUL, which a text column refuses.
    await bus.js.publish(subject, b'{"type":"call.ringing\\u0000"}')
    await bus.publish(ev.CallEnded(org_id="o1", call_id="c1"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 5))
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(2,), (5,)]
    dead = rows(database_url, "SELECT position, subject, reason, payload FROM dead_letters "
                              "ORDER BY 1")
    assert [(p, s) for p, s, _, _ in dead] == [(1, subject), (3, subject), (4, subject)]
    assert dead[0][2].startswith("unstorable") and "utf-8" in dead[0][2].lower()
    assert dead[1][2].startswith("unstorable") and "out of range" in dead[1][2]
    assert dead[2][2].startswith("undecodable") and "call.ringing\\0" in dead[2][2]
    assert bytes(dead[0][3]).endswith(b'"caf\xe9"}')
    assert rows(database_url, "SELECT state, event_count FROM calls") == [("ended", 2)]


async def test_an_event_on_another_orgs_subject_is_a_dead_letter_not_that_orgs_event(
        bus: Bus, database_url: str) -> None:
    # Tenancy is in the subject: whoever may publish on o2's subjects must not write o1's
    # history (its call state, its audit trail), nor give one event two orgs (the stream
    # files it under o2, the store would under o1).
    await bus.publish(ev.CallAnswered(org_id="o1", call_id="c1"))
    forged = ev.CallEnded(org_id="o1", call_id="c1", reason="max_duration")
    await bus.js.publish("parley.ev.o2.call.c1.call.ended", ev.encode(forged))
    await bus.js.publish("parley.ev.o1.call.c1.call.ringing", ev.encode(forged))
    await bus.publish(ev.AgentDeleted(org_id="o1", agent_id="a1", actor="user:ann"))
    async with running_recorder(bus, database_url):
        await wait_for(lambda: _at(database_url, 4))
    assert rows(database_url, "SELECT position FROM events ORDER BY 1") == [(1,), (4,)]
    dead = rows(database_url, "SELECT position, subject, reason FROM dead_letters ORDER BY 1")
    assert [(p, s) for p, s, _ in dead] == [(2, "parley.ev.o2.call.c1.call.ended"),
                                            (3, "parley.ev.o1.call.c1.call.ringing")]
    assert all(r.startswith("mismatched subject") and "parley.ev.o1.call.c1.call.ended" in r
               for _, _, r in dead)
    assert rows(database_url, "SELECT state, end_reason FROM calls") == [("answered", "")]
    assert rows(database_url, "SELECT type FROM audit_log") == [("agent.deleted",)]
