"""Ends the orphan check never saw: claimed but never stored, or of calls never answered."""

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from parley.common.events import CallDialing, CallRequested
from parley.common.metrics import Metrics
from parley.gateway import call_outboxes, orphans
from parley.gateway.calls import CarrierCall, find_by_call_id, new_call_id, record_carrier_call
from parley.recorder.projections import CallsProjection
from parley.recorder.worker import Recorder

from . import test_nats_outage as outage
from . import test_plivo_support as plivo_support
from .conftest import CASCADING_AGENT, CASCADING_NUMBER, ORG, new_call_sid, started_stream, wait_for


def later(minutes: float):
    """A gateway's clock ``minutes`` ahead of now."""
    return lambda: datetime.now(UTC) + timedelta(minutes=minutes)


bus = outage.bus  # the gateway's bus on this test's server, as the NATS-outage tests have it


async def dialled_unanswered(db, call_sid: str, *, carrier: str = "twilio"):
    """An outbound call recorded as dialled, never answered (ringing at Twilio's fake)."""
    call, _ = await record_carrier_call(db, CarrierCall(
        carrier=carrier, carrier_call_id=call_sid, call_id=new_call_id(), org_id=ORG,
        agent_id=CASCADING_AGENT, direction="outbound", from_number=CASCADING_NUMBER,
        to_number="+14155550199"))
    return call


async def stored_ends(bus, call_id: str) -> list:
    try:
        return [e for e in await bus.replay_call(call_id)
                if e.type in ("call.ended", "call.failed")]
    except Exception:  # JetStream still recovering
        return []


async def test_an_end_whose_claim_postgres_was_too_slow_to_give_back_is_published_later(
        nats_server_of_test, bus, make_gateway, events, database_url, db, monkeypatch):
    """A stop during a NATS outage with Postgres slow: the caller's end, given up, could not
    give its claim back within 2 s and was cancelled. ended_at stayed set, call.ended was never
    stored, and the orphan check (calls not claimed ended) skipped the call for ever."""
    monkeypatch.setattr("parley.gateway.app.DRAIN_AT_SHUTDOWN_S", 1.0)
    monkeypatch.setattr(call_outboxes, "PUBLISH_ATTEMPTS", 1000)  # retried until the stop
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert nats_server_of_test.proc is not None
    nats_server_of_test.proc.kill()
    nats_server_of_test.proc.wait()
    await wait_for(lambda: not bus.nc.is_connected)
    for _ in range(60):  # caller audio past the client's 8 KiB buffer: what follows is refused
        await stream.media(b"\xff" * 160)
    await stream.stop(call_sid)  # the caller hangs up: the end is claimed, not published
    await wait_for(lambda: _ended(db, call_id))
    async with await psycopg.AsyncConnection.connect(database_url) as locker:
        await locker.execute("SELECT 1 FROM carrier_calls WHERE call_id = %s FOR UPDATE",
                             (call_id,))  # the give-back waits on this row
        await asyncio.wait_for(gateway.client.close(), 30)
        # The give-back, cancelled, may still be waiting on the lock in its backend (the cancel
        # closed the client's side only): ended then as the lock goes, in autocommit. A crash
        # kills it; so does this, before the lock is let go.
        await locker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
        await locker.rollback()
    assert await _ended(db, call_id)  # still claimed, never published
    nats_server_of_test.start()
    await wait_for(lambda: bus.nc.is_connected, timeout=15)
    # two instances, their clocks past the bound, both settling
    for _ in range(2):
        await make_gateway(rest=True, gateway_orphan_check_s=0.2, clock=later(10))
    [ended] = await wait_for(lambda: stored_ends(bus, call_id), timeout=15)
    assert ended.type == "call.ended" and ended.reason == "caller_hangup"
    await asyncio.sleep(1.0)  # more rounds, of both
    assert len(await stored_ends(bus, call_id)) == 1


async def test_an_end_stored_is_not_published_again(make_gateway, bus, events, db):
    """The settling finds the end in the event store (published, or a SIGKILL after its ack):
    it only marks the call, publishing nothing."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.stop(call_sid)
    await events.wait("call.ended", call_id)
    await make_gateway(rest=True, gateway_orphan_check_s=0.1, clock=later(10))
    await wait_for(lambda: _milestone(db, call_id, "end:stored"))
    await asyncio.sleep(0.5)
    assert len(await stored_ends(bus, call_id)) == 1


async def test_an_end_stored_is_marked_so_as_it_is_confirmed(make_gateway, events, db):
    """Unmarked, every call ended cost the settling round a JetStream lookup 5 min later."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.stop(call_sid)
    await events.wait("call.ended", call_id)
    await wait_for(lambda: _milestone(db, call_id, "end:stored"), timeout=5)


async def test_a_call_never_answered_whose_failure_was_lost_is_failed_as_twilio_has_it(
        make_gateway, bus, events, db):
    """An outbound call Twilio found busy: its call.failed given up (NATS away), the claim was
    given back, and the call, never answered, stayed dialling in the store for good: the
    orphan check looks only at answered calls."""
    call_sid = new_call_sid()
    call = await dialled_unanswered(db, call_sid)
    ringing = await make_gateway(rest=True, gateway_orphan_check_s=0.2, clock=later(1))
    await asyncio.sleep(1.0)  # rounds within the bound: not asked
    assert ringing.rest_fake.fetches == []
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.2, clock=later(20))
    gateway.rest_fake.ended[call_sid] = ("busy", 0)
    [failed] = await events.wait("call.failed", call.call_id, timeout=10)
    assert (failed.reason, failed.carrier_status) == ("busy", "busy")


async def test_a_call_never_answered_still_ringing_is_left_alone(make_gateway, events, db):
    call_sid = new_call_sid()
    call = await dialled_unanswered(db, call_sid)
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.1, clock=later(20))
    await wait_for(lambda: call_sid in gateway.rest_fake.fetches)  # in progress at Twilio
    await asyncio.sleep(0.5)
    assert events.of("call.failed", call.call_id) == events.of("call.ended", call.call_id) == []


async def _ended(db, call_id: str) -> bool:
    call = await find_by_call_id(db, call_id)
    return call is not None and call.ended


async def _milestone(db, call_id: str, milestone: str) -> bool:
    cursor = await db.execute("SELECT 1 FROM carrier_call_milestones WHERE call_id = %s "
                              "AND milestone = %s", (call_id, milestone))
    return await cursor.fetchone() is not None


async def test_the_carrier_is_asked_about_a_bounded_number_of_unanswered_calls_a_round(
        make_gateway, db, monkeypatch):
    """Every call never answered nor ended was asked of its carrier in each round, one REST
    lookup each: a backlog (calls the old code left dialling, a carrier failing the lookups)
    made a round as many lookups as calls, every 30 s on every instance, against the
    carrier's rate limits, and held up the orphan check of live calls for as long. A round
    asks about so many at most, the next round going on from where it stopped."""
    from parley.gateway import orphans
    monkeypatch.setattr(orphans, "UNANSWERED_LOOKUPS_PER_ROUND", 2)
    sids = [new_call_sid() for _ in range(3)]
    for sid in sids:  # ringing at Twilio (the fake's default: in progress)
        await dialled_unanswered(db, sid)
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0, clock=later(20))
    asked = lambda: [sid for sid in gateway.rest_fake.fetches if sid in sids]  # noqa: E731
    cursor = await orphans.settle_unanswered(gateway.app)
    assert len(asked()) == 2, asked()
    await orphans.settle_unanswered(gateway.app, cursor)  # the one left, not the first two again
    assert sorted(asked()) == sorted(sids)


# the shared Plivo fixtures, made visible to pytest in this module
make_plivo_gateway = plivo_support.make_plivo_gateway
plivo_number = plivo_support.plivo_number


# (hangup_cause_code, hangup_cause_name, hangup_source). 0-1020, 2000-2070 and 4000-4030 are
# as Plivo's hangup-causes page lists them; the page's recipient causes (3000s) are read by
# name, so the codes given them here are not relied on.
@pytest.mark.parametrize(("cause", "reason"), [
    ((3000, "Busy Line", "Callee"), "busy"),
    ((3010, "Rejected", "Callee"), "busy"),
    ((3020, "No Answer", "Callee"), "no_answer"),
    ((3030, "Ring Timeout Reached", "Plivo"), "no_answer"),
    ((1000, "Canceled", "API Request"), "canceled"),
    ((2000, "Invalid Destination Address", "Plivo"), "failed"),
])
async def test_a_plivo_call_never_answered_is_failed_as_plivo_has_it(
        make_plivo_gateway, events, db, cause, reason):
    """An outbound Plivo call found over and never answered was settled as call.ended
    ``completed`` (every record Plivo has was taken for a completed call): Plivo's record of it
    says why it ended (hangup_cause_*), and that it was never answered (no answer_time), so it
    fails as Plivo's hangup callback would have failed it, and as Twilio's are settled."""
    call_uuid = plivo_support.new_call_uuid()
    call = await dialled_unanswered(db, call_uuid, carrier="plivo")
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.2, clock=later(20))
    gateway.api.unanswered[call_uuid] = cause
    [failed] = await events.wait("call.failed", call.call_id, timeout=10)
    assert (failed.reason, failed.carrier_status) == (reason, cause[1])
    assert events.of("call.ended", call.call_id) == []


async def test_a_plivo_call_answered_unbeknown_to_us_ends_completed(
        make_plivo_gateway, events, db):
    """Plivo's record has it answered (its answer callback never reached us) and over: ended
    completed, Plivo's duration."""
    call_uuid = plivo_support.new_call_uuid()
    call = await dialled_unanswered(db, call_uuid, carrier="plivo")
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.2, clock=later(20))
    gateway.api.ended[call_uuid] = 17
    [ended] = await events.wait("call.ended", call.call_id, timeout=10)
    assert (ended.reason, ended.duration_s) == ("completed", 17.0)


async def test_an_end_still_being_published_when_it_is_settled_is_stored_once(
        make_gateway, bus, events, db, monkeypatch):
    """The settling publishes an end claimed 5 min ago and not in the event store; the end's
    own outbox may still be publishing it then (retrying through an outage), or the instance
    settling runs on a clock 5 min ahead. Each end had an id of its own, so both were stored:
    two call.ended for one call, in the store and to every reader of the stream. A call's end
    has one id, so JetStream (and, past its window, the recorder) stores it once."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)
    stream, call_sid, call_id = await started_stream(gateway, events)
    publish, held, release, published = bus.publish, asyncio.Event(), asyncio.Event(), []

    async def holding_the_end(event, *args, **kwargs):
        if event.type == "call.ended" and not held.is_set():
            held.set()  # the outbox's first attempt, as if NATS were slow to take it
            await release.wait()
            ack = await publish(event, *args, **kwargs)
            published.append(ack)
            return ack
        return await publish(event, *args, **kwargs)

    monkeypatch.setattr(bus, "publish", holding_the_end)
    await stream.stop(call_sid)  # the caller hangs up: the end claimed, its publish held
    await asyncio.wait_for(held.wait(), 5)
    settler = await make_gateway(rest=True, gateway_orphan_check_s=0, clock=later(10))
    await orphans.settle_claimed_ends(settler.app)  # not in the store yet: published
    assert await _milestone(db, call_id, "end:stored")
    release.set()
    await wait_for(lambda: published)
    ends = await stored_ends(bus, call_id)
    assert [end.type for end in ends] == ["call.ended"], ends


async def test_a_plivo_call_still_queued_at_plivo_is_left_alone(make_plivo_gateway, events, db):
    """An outbound Plivo call not dialled yet, waiting in Plivo's queue (the account's calls per
    second spent), is still keyed by its RequestUUID: the live call and record lookups do not
    know that id, and it was failed as 'unknown' while Plivo was about to dial it. Plivo's
    queued call lookup (GET Call/{request_uuid}/?status=queued) knows it: left for a later
    round."""
    request_uuid = plivo_support.new_call_uuid()
    call = await dialled_unanswered(db, request_uuid, carrier="plivo")
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.1, clock=later(20))
    gateway.api.queued.add(request_uuid)
    await orphans.settle_unanswered(gateway.app)
    await asyncio.sleep(0.5)
    assert events.of("call.failed", call.call_id) == events.of("call.ended", call.call_id) == []


async def test_a_plivo_request_no_callback_ever_named_is_failed_saying_so(
        make_plivo_gateway, events, db):
    """A RequestUUID Plivo no longer has queued, and no callback ever gave us its call's
    CallUUID: Plivo's live call and record lookups take a CallUUID only, and nothing of its API
    maps a RequestUUID to one, so whether it rang cannot be asked. It fails, saying that rather
    than 'unknown'."""
    request_uuid = plivo_support.new_call_uuid()
    call = await dialled_unanswered(db, request_uuid, carrier="plivo")
    await make_plivo_gateway(gateway_orphan_check_s=0.2, clock=later(20))
    [failed] = await events.wait("call.failed", call.call_id, timeout=10)
    assert failed.reason == "failed"
    assert failed.carrier_status == orphans.PLIVO_REQUEST_UNKNOWN


@contextlib.asynccontextmanager
async def running_recorder(bus, database_url: str):
    """The recorder, keeping the ``calls`` read model from the events as in production."""
    recorder = Recorder(bus, database_url, [CallsProjection()], metrics=Metrics("recorder"))
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        yield recorder
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _call_row(db, call_id: str) -> tuple | None:
    cursor = await db.execute("SELECT state, failure_reason FROM calls WHERE call_id = %s",
                              (call_id,))
    return await cursor.fetchone()


async def requested(bus, call_id: str, *, minutes_ago: float) -> None:
    """The call.requested of an outbound Twilio call, made ``minutes_ago``."""
    await bus.publish(CallRequested(
        org_id=ORG, call_id=call_id, direction="outbound", agent_id=CASCADING_AGENT,
        from_number=CASCADING_NUMBER, to_number="+14155550199", carrier="twilio",
        at=datetime.now(UTC) - timedelta(minutes=minutes_ago)))


async def test_a_call_requested_and_never_dialled_is_failed(
        make_gateway, bus, events, db, database_url):
    """A POST /v1/calls whose gateway died after publishing call.requested and before asking
    the carrier (its Idempotency-Key's retry took the key over with a new call id): nothing
    recorded a carrier id for the call, nor would anything ever end it, so the calls read
    model had it "requested" for good. Long enough after, it fails, "never dialled"."""
    stale, recent = new_call_id(), new_call_id()
    async with running_recorder(bus, database_url):
        await requested(bus, stale, minutes_ago=20)
        await requested(bus, recent, minutes_ago=1)
        await wait_for(lambda: _call_row(db, recent), timeout=10)
        assert await _call_row(db, stale) == ("requested", "")
        await make_gateway(rest=True, gateway_orphan_check_s=0.2)
        [failed] = await events.wait("call.failed", stale, timeout=10)
        assert (failed.reason, failed.carrier_status) == ("failed", orphans.NEVER_DIALLED)
        await wait_for(lambda: _state_is(db, stale, ("failed", "failed")), timeout=10)
        await asyncio.sleep(0.5)  # rounds more: failed once; the recent request left alone
    assert len(events.of("call.failed", stale)) == 1
    assert events.of("call.failed", recent) == []
    assert await _call_row(db, recent) == ("requested", "")


async def test_a_requested_call_a_carrier_recorded_or_dialing_is_not_failed_never_dialled(
        make_gateway, bus, events, db, database_url):
    """Requested 20 minutes ago as the read model has it, but dialled: a carrier id recorded
    (its webhooks: the unanswered calls' settling asks the carrier about it), or call.dialing
    in the stream the read model has not caught up with."""
    recorded, dialing = new_call_id(), new_call_id()
    async with running_recorder(bus, database_url):
        await requested(bus, recorded, minutes_ago=20)
        await requested(bus, dialing, minutes_ago=20)
        await wait_for(lambda: _call_row(db, dialing), timeout=10)
        await wait_for(lambda: _call_row(db, recorded), timeout=10)
    await record_carrier_call(db, CarrierCall(
        carrier="twilio", carrier_call_id=new_call_sid(), call_id=recorded, org_id=ORG,
        agent_id=CASCADING_AGENT, direction="outbound", from_number=CASCADING_NUMBER,
        to_number="+14155550199"))
    await bus.publish(CallDialing(org_id=ORG, call_id=dialing, carrier_call_id="CA" + "1" * 32))
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)
    await orphans.settle_never_dialled(gateway.app)
    assert events.of("call.failed", recorded) == events.of("call.failed", dialing) == []


async def _state_is(db, call_id: str, expected: tuple) -> bool:
    return await _call_row(db, call_id) == expected
