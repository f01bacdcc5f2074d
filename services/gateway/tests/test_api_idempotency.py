"""``Idempotency-Key`` on ``POST /v1/calls``: a retried request does not ring the callee twice.

Real Postgres and NATS; Twilio is the stand-in of test_api_calls, reached through the twilio SDK.
"""

import asyncio
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
from multidict import CIMultiDict

from parley.gateway import outbound
from parley.gateway.api import idempotency
from parley.gateway.api.schemas import PlaceCall
from parley.gateway.keys import BUS

from . import test_api_calls as calls_support
from . import test_plivo_support as support
from .conftest import ACCOUNT, CASCADING_AGENT, CASCADING_NUMBER, ORG, wait_for
from .test_api_calls import CALLEE, FrozenClock, body, drop_connection, other_body

# the shared fixtures of the calls API tests, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number
twilio_api = calls_support.twilio_api
keys = calls_support.keys


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def api(make_plivo_gateway, twilio_api, clock):
    return await make_plivo_gateway(twilio_account_sid=ACCOUNT,
                                    twilio_api_base_url=twilio_api.url, clock=clock)


async def place(api, key: str, payload: Any, idempotency_key: str | None = None,
                **headers: str):
    sent = CIMultiDict({"X-API-Key": key, **headers})
    if idempotency_key is not None:
        sent.add("Idempotency-Key", idempotency_key)
    return await api.gateway.client.post("/v1/calls", json=payload, headers=sent)


async def twilio_reports_status(api, call_id: str, call_status: str) -> None:
    """Twilio's status webhook for the outbound call it placed first (CA00…01): what records
    the call in the store."""
    ids = f"call_id={call_id}&org_id={ORG}&agent_id={CASCADING_AGENT}"
    status = await api.gateway.post(f"/twilio/status?{ids}", {
        "CallSid": f"CA{1:032x}", "AccountSid": ACCOUNT, "From": CASCADING_NUMBER,
        "To": CALLEE, "Direction": "outbound-api", "CallStatus": call_status})
    assert status.status in (200, 204), await status.text()


async def test_a_retry_with_the_same_key_gets_the_same_call_and_dials_once(
        api, twilio_api, keys, events, db):
    first = await place(api, keys["full"], body(context={"name": "Ada"}), "order-42-call")
    assert first.status == 201, await first.text()
    created = await first.json()
    assert "Idempotent-Replayed" not in first.headers

    retry = await place(api, keys["write"], body(context={"name": "Ada"}), "order-42-call")
    assert retry.status == 201, await retry.text()
    assert await retry.json() == created
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Location"] == f"/v1/calls/{created['call_id']}"
    assert len(twilio_api.requests) == 1  # the callee rang once
    await events.wait("call.dialing", created["call_id"])
    assert len(events.of("call.requested")) == 1

    # neither the body nor the API key is kept: the body's hash and the outcome
    cursor = await db.execute("SELECT org_id, idempotency_key, request_hash, call_id, state, "
                              "response_status, response_body FROM api_idempotency_keys")
    [(org, key, digest, call_id, state, status, stored)] = await cursor.fetchall()
    assert (org, key, call_id, state, status) == (ORG, "order-42-call", created["call_id"],
                                                  "done", 201)
    assert len(digest) == 64 and "Ada" not in bytes(stored).decode()


async def test_a_call_the_carrier_may_have_placed_is_not_dialled_again(
        api, twilio_api, keys, events):
    # Twilio dropped the connection after reading the request: it may have placed the call, and
    # the 502 invites a retry. With the key, the retry gets that 502 back, not a second dial.
    twilio_api.drop = True
    first = await place(api, keys["full"], body(), "k-502")
    assert first.status == 502
    problem = await first.json()
    twilio_api.drop = False
    retry = await place(api, keys["full"], body(), "k-502")
    assert (retry.status, await retry.json()) == (502, problem)
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content_type == "application/problem+json"
    assert len(twilio_api.requests) == 1


async def test_the_same_key_with_another_body_is_a_422(api, twilio_api, keys):
    assert (await place(api, keys["full"], body(), "k-body")).status == 201
    response = await place(api, keys["full"], body(metadata={"crm_id": "7"}), "k-body")
    assert response.status == 422
    problem = await response.json()
    assert problem["type"].endswith("/idempotency-key-reused")
    assert len(twilio_api.requests) == 1
    # the same body written otherwise (keys in another order) is the same request
    reordered = {"from": CASCADING_NUMBER, "to": CALLEE, "agent_id": CASCADING_AGENT}
    assert (await place(api, keys["full"], reordered, "k-body")).status == 201
    assert len(twilio_api.requests) == 1


async def test_a_retry_while_the_first_is_in_flight_is_a_409(api, twilio_api, keys):
    twilio_api.hold = asyncio.Event()
    first = asyncio.create_task(place(api, keys["full"], body(), "k-busy"))
    try:
        await wait_for(lambda: twilio_api.requests)  # the carrier is being asked
        retry = await place(api, keys["full"], body(), "k-busy")
        assert retry.status == 409
        assert retry.headers["Retry-After"] == "1"
        assert (await retry.json())["type"].endswith("/idempotency-key-in-use")
    finally:
        twilio_api.hold.set()
    response = await first
    assert response.status == 201
    call_id = (await response.json())["call_id"]
    again = await place(api, keys["full"], body(), "k-busy")
    assert (again.status, (await again.json())["call_id"]) == (201, call_id)
    assert len(twilio_api.requests) == 1


async def test_an_interrupted_first_request_is_decided_by_what_is_recorded(
        api, twilio_api, keys, clock):
    # The first request's process stops answering mid-dial (here: Twilio holds it past the
    # key's lease). A retry is neither blocked for ever nor dialled again: without a record
    # of the call it says so, naming the call; once the carrier's webhook records it, it is
    # the 201 the first request would have answered.
    twilio_api.hold = asyncio.Event()
    first = asyncio.create_task(place(api, keys["full"], body(), "k-died"))
    try:
        await wait_for(lambda: twilio_api.requests)
        clock.advance(idempotency.IN_FLIGHT_LEASE.total_seconds() + 1)
        retry = await place(api, keys["full"], body(), "k-died")
        assert retry.status == 500
        problem = await retry.json()
        assert problem["type"].endswith("/idempotency-key-interrupted")
        call_id = problem["call_id"]
        assert len(twilio_api.requests) == 1

        await twilio_reports_status(api, call_id, "initiated")
        retry = await place(api, keys["full"], body(), "k-died")
        assert retry.status == 201
        assert (await retry.json())["call_id"] == call_id
        assert retry.headers["Idempotent-Replayed"] == "true"
    finally:
        twilio_api.hold.set()
        await first
    assert len(twilio_api.requests) == 1


async def test_another_orgs_same_key_is_its_own(api, twilio_api, keys):
    ours = await place(api, keys["full"], body(), "shared-key")
    theirs = await place(api, keys["other"], other_body(), "shared-key")
    assert (ours.status, theirs.status) == (201, 201)
    assert (await ours.json())["call_id"] != (await theirs.json())["call_id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert len(twilio_api.requests) == 2


async def test_without_a_key_every_request_is_a_call(api, twilio_api, keys, db):
    for _ in range(2):
        assert (await place(api, keys["full"], body())).status == 201
    assert len(twilio_api.requests) == 2
    cursor = await db.execute("SELECT count(*) FROM api_idempotency_keys")
    assert (await cursor.fetchone())[0] == 0


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_a_malformed_key_is_a_400(api, twilio_api, keys, value):
    response = await api.gateway.client.post("/v1/calls", json=body(), headers={
        "X-API-Key": keys["full"], "Idempotency-Key": value.encode().decode("latin-1")})
    assert response.status == 400
    assert (await response.json())["type"].endswith("/invalid-idempotency-key")
    assert not twilio_api.requests


async def test_two_keys_in_one_request_are_a_400(api, twilio_api, keys):
    response = await place(api, keys["full"], body(), "one", **{"Idempotency-Key": "two"})
    assert response.status == 400
    assert not twilio_api.requests


async def test_a_rate_limited_request_gives_its_key_back(make_plivo_gateway, twilio_api, keys,
                                                         clock):
    api = await make_plivo_gateway(twilio_account_sid=ACCOUNT, twilio_api_base_url=twilio_api.url,
                                   gateway_call_rate_per_s=1, gateway_call_burst=1, clock=clock)
    assert (await place(api, keys["full"], body())).status == 201
    assert (await place(api, keys["full"], body(), "k-429")).status == 429
    clock.advance(1)
    response = await place(api, keys["full"], body(), "k-429")
    assert response.status == 201  # placed now, not the 429 replayed
    assert "Idempotent-Replayed" not in response.headers
    assert len(twilio_api.requests) == 2


async def test_keys_expire_after_a_day(api, twilio_api, keys, clock, db):
    first = await place(api, keys["full"], body(), "k-day")
    clock.advance(23 * 3600)
    assert (await (await place(api, keys["full"], body(), "k-day")).json()) == (
        await first.json())
    clock.advance(3600)
    response = await place(api, keys["full"], body(), "k-day")  # a day on: a new request
    assert response.status == 201 and "Idempotent-Replayed" not in response.headers
    assert (await place(api, keys["full"], body(), "k-other")).status == 201
    assert len(twilio_api.requests) == 3

    clock.advance(24 * 3600)
    assert await idempotency.expire(api.gateway.app) == 2
    cursor = await db.execute("SELECT count(*) FROM api_idempotency_keys")
    assert (await cursor.fetchone())[0] == 0


async def test_a_gateway_stopped_while_recording_a_placed_call(
        make_plivo_gateway, twilio_api, keys, clock, db, monkeypatch):
    # Twilio placed the call; Postgres drops every connection that records it, and the gateway
    # is stopped while it waits to try again: the integrator's connection is reset. Its retry
    # on another instance is not dialled again, nor blocked for ever once the key's lease is
    # over: decided by what is recorded (nothing yet: a 500 naming the call; once Twilio's
    # status webhook recorded the call, the 201 with its id).
    monkeypatch.setattr(outbound, "RECORD_RETRY_DELAYS_S", (30.0,))
    await drop_connection(db, "carrier_calls", times=100)
    settings = {"twilio_account_sid": ACCOUNT, "twilio_api_base_url": twilio_api.url,
                "clock": clock}
    stopping = await make_plivo_gateway(shutdown_timeout=0.5, **settings)
    first = asyncio.create_task(place(stopping, keys["full"], body(), "k-stop"))

    async def dropped() -> int:
        cursor = await db.execute("SELECT last_value, is_called FROM dropped_carrier_calls")
        value, called = await cursor.fetchone()
        return value if called else 0

    await wait_for(dropped)
    await stopping.gateway.client.close()  # the gateway stops mid-request
    with pytest.raises(aiohttp.ClientError):
        await first
    await db.execute("DROP TRIGGER drop_connection ON carrier_calls")

    api = await make_plivo_gateway(**settings)
    retry = await place(api, keys["full"], body(), "k-stop")
    assert retry.status == 409  # the lease has not run out: it may still be in flight
    clock.advance(idempotency.IN_FLIGHT_LEASE.total_seconds() + 1)
    retry = await place(api, keys["full"], body(), "k-stop")
    assert retry.status == 500
    call_id = (await retry.json())["call_id"]

    await twilio_reports_status(api, call_id, "ringing")
    retry = await place(api, keys["full"], body(), "k-stop")
    assert (retry.status, (await retry.json())["call_id"]) == (201, call_id)
    assert len(twilio_api.requests) == 1  # the callee rang once


async def claimed_by_a_request_that_died(api, payload, key: str,
                                        call_id: str) -> idempotency.Claim:
    """The key claimed for ``payload`` as the request placing it claims it, by a request that
    did nothing after (its process died)."""
    digest = idempotency.request_hash(msgspec.convert(payload, PlaceCall), to_number=CALLEE,
                                      from_number=CASCADING_NUMBER)
    claim = await idempotency.claim(api.gateway.app, org_id=ORG, key=key, request_hash=digest,
                                    call_id=call_id)
    assert isinstance(claim, idempotency.Claim)
    return claim


async def test_a_key_whose_request_died_before_dialling_is_taken_over_by_a_retry(
        api, twilio_api, keys, clock, events):
    # The first request claimed the key and its process died before it asked the carrier (here:
    # the claim, made as the request makes it, and nothing after). Its retry was a 500 naming a
    # call never placed, for the key's whole day: nothing told it from a request that died
    # mid-dial. A claim never marked dialling is taken over once its lease is out, and the
    # retry dials, once; within the lease it is a 409, as a request in flight.
    payload = body()
    dead = await claimed_by_a_request_that_died(api, payload, "k-dead", "call_" + "d" * 32)
    early = await place(api, keys["full"], payload, "k-dead")
    assert early.status == 409 and twilio_api.requests == []
    clock.advance(idempotency.CLAIM_LEASE.total_seconds() + 1)
    retry = await place(api, keys["full"], payload, "k-dead")
    assert retry.status == 201, await retry.text()
    call_id = (await retry.json())["call_id"]
    assert call_id != dead.call_id and "Idempotent-Replayed" not in retry.headers
    await events.wait("call.dialing", call_id)
    again = await place(api, keys["full"], payload, "k-dead")
    assert (again.status, (await again.json())["call_id"]) == (201, call_id)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(twilio_api.requests) == 1  # the callee rang once


async def test_a_slow_first_request_whose_key_was_taken_over_does_not_dial(
        api, twilio_api, keys, clock, events, monkeypatch):
    # The first request is only slow (its call.requested held past the claim's lease): the
    # retry takes the key over and dials; the first, going on, finds its claim gone and dials
    # nothing (a 409), and fails the call it had requested. The callee rings once.
    bus = api.gateway.app[BUS]
    publish, held = bus.publish, asyncio.Event()

    async def holding_the_first_request(event, *args, **kwargs):
        if event.type == "call.requested" and not held.is_set():
            held.set()
            await release.wait()
        return await publish(event, *args, **kwargs)

    release = asyncio.Event()
    monkeypatch.setattr(bus, "publish", holding_the_first_request)
    first = asyncio.create_task(place(api, keys["full"], body(), "k-slow"))
    await asyncio.wait_for(held.wait(), 5)
    clock.advance(idempotency.CLAIM_LEASE.total_seconds() + 1)
    retry = await place(api, keys["full"], body(), "k-slow")
    assert retry.status == 201, await retry.text()
    call_id = (await retry.json())["call_id"]
    release.set()
    response = await first
    assert response.status == 409, await response.text()
    superseded = (await response.json())["call_id"]
    assert superseded != call_id
    [failed] = await events.wait("call.failed", superseded)
    assert events.of("call.dialing", superseded) == []
    again = await place(api, keys["full"], body(), "k-slow")
    assert (again.status, (await again.json())["call_id"]) == (201, call_id)
    assert len(twilio_api.requests) == 1  # the callee rang once


async def test_a_key_not_marked_dialling_for_a_database_outage_is_a_503_of_the_store(
        api, twilio_api, keys, events, db):
    # Postgres drops the connection that marks the key dialling: nothing is dialled, and the
    # 503 says the database was unavailable (it said bus-unavailable, the event bus being
    # up). The key is given back: the retry dials, once.
    await drop_connection(db, "api_idempotency_keys", "NEW.state = 'in_flight'")
    response = await place(api, keys["full"], body(), "k-mark")
    assert response.status == 503, await response.text()
    problem = await response.json()
    assert problem["type"].endswith("/store-unavailable")
    assert problem["detail"].startswith("the database is unavailable, so the call was not "
                                        "dialled; it is safe to retry")
    assert int(response.headers["Retry-After"]) >= 1
    assert api.gateway.metric("gateway_api_calls_placed_total", outcome="not_dialled") == 1
    [failed] = await events.wait("call.failed")
    assert failed.id == outbound.not_dialled_event_id(failed.call_id)
    assert twilio_api.requests == []
    retry = await place(api, keys["full"], body(), "k-mark")
    assert retry.status == 201, await retry.text()
    assert len(twilio_api.requests) == 1


async def test_a_key_marked_dialling_not_dialled_nor_given_back_is_taken_over_by_a_retry(
        api, twilio_api, keys, events, db, monkeypatch):
    # The mark is written but its answer is lost (Postgres gone between its commit and the
    # reply), and giving the key back fails too: the key stayed in_flight, and the retry
    # the 503 invited was a 409, then, once its lease ran out, a 500 saying the key will not
    # dial though nothing was dialled. The call.failed its request published for the call not
    # dialled proves it: the retry takes the key over and dials, once.
    mark = idempotency.mark_dialling

    async def answer_lost(app, claim):
        await mark(app, claim)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(idempotency, "mark_dialling", answer_lost)
    await db.execute("""
        CREATE FUNCTION drop_give_back() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN OLD; END $$;
        CREATE TRIGGER drop_give_back BEFORE DELETE ON api_idempotency_keys
            FOR EACH ROW EXECUTE FUNCTION drop_give_back();""")
    response = await place(api, keys["full"], body(), "k-lost")
    assert response.status == 503, await response.text()
    assert "safe to retry" in (await response.json())["detail"]
    cursor = await db.execute("SELECT state, call_id FROM api_idempotency_keys")
    [(state, stale_call_id)] = await cursor.fetchall()
    assert state == "in_flight"
    await events.wait("call.failed", stale_call_id)
    monkeypatch.setattr(idempotency, "mark_dialling", mark)
    await db.execute("DROP TRIGGER drop_give_back ON api_idempotency_keys")

    retry = await place(api, keys["full"], body(), "k-lost")
    assert retry.status == 201, await retry.text()
    call_id = (await retry.json())["call_id"]
    assert call_id != stale_call_id and "Idempotent-Replayed" not in retry.headers
    again = await place(api, keys["full"], body(), "k-lost")
    assert (again.status, (await again.json())["call_id"]) == (201, call_id)
    assert len(twilio_api.requests) == 1  # the callee rang once


async def test_a_key_left_dialling_by_a_request_that_died_mid_dial_still_will_not_dial(
        api, twilio_api, keys, clock, events):
    # The other side of the takeover above: a key marked dialling whose call has no
    # call.failed of not dialled (its request died asking the carrier) is still decided by
    # what is recorded: a 500, nothing dialled.
    payload = body()
    dead = await claimed_by_a_request_that_died(api, payload, "k-mid-dial", "call_" + "e" * 32)
    await idempotency.mark_dialling(api.gateway.app, dead)
    clock.advance(idempotency.IN_FLIGHT_LEASE.total_seconds() + 1)
    retry = await place(api, keys["full"], payload, "k-mid-dial")
    assert retry.status == 500, await retry.text()
    assert twilio_api.requests == []
