"""The callbacks schedule_callback books are dialled by the gateway when they are due."""

import asyncio
from typing import Any

import pytest

from parley.common.bus import EVENTS_STREAM
from parley.common.configuration import assign_number, create_agent, create_org, update_agent
from parley.common.events import CallFailed, CallRequested
from parley.gateway import outbound
from parley.gateway.due_callbacks import BATCH, place_due
from parley.gateway.keys import TWILIO_REST

from . import test_plivo_support as support
from .conftest import ACCOUNT, CALLER, CASCADING_AGENT, CASCADING_NUMBER, ORG, wait_for
from .test_api_calls import drop_connection, twilio_api  # noqa: F401 (a fixture)

make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number

NUMBER_FAULT = (400, {"code": 21211, "message": "The 'To' number +14155550123 is not a valid "
                      "phone number.", "status": 400})
OUTAGE = (500, {"code": 20500, "message": "Internal Server Error", "status": 500})


@pytest.fixture
async def make_dialler(make_plivo_gateway, twilio_api, db):  # noqa: F811
    """A gateway whose due-callback loop looks every 50 ms, dialling Twilio's stand-in; the
    cascading agent may call back numbers starting +1415."""
    async def make(**overrides: Any):
        settings = {"twilio_account_sid": ACCOUNT, "twilio_api_base_url": twilio_api.url,
                    "gateway_callback_interval_s": 0.05, **overrides}
        gateway = (await make_plivo_gateway(**settings)).gateway
        await update_agent(db, ORG, CASCADING_AGENT, {"callback_number_prefixes": ["+1415"]})
        return gateway

    return make


async def book(db, call_id: str, tool_call_id: str, *, number: str = CALLER,
               due_in_s: float = -1.0, note: str = "the refund for order 42",
               org_id: str = ORG, agent_id: str = CASCADING_AGENT) -> int:
    """A row as schedule_callback writes it; its id."""
    cursor = await db.execute(
        "INSERT INTO tool_callbacks (org_id, call_id, tool_call_id, agent_id, number, "
        "callback_at, note) VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s), %s) "
        "RETURNING id", (org_id, call_id, tool_call_id, agent_id, number, due_in_s, note))
    return (await cursor.fetchone())[0]


async def place_due_while_nats_cannot_store(gateway, bus) -> int:
    """A round of due callbacks while JetStream has no stream to store call.requested in (as
    when NATS is unavailable); the streams are back after it. What place_due returned."""
    await bus.js.delete_stream(EVENTS_STREAM)
    try:
        return await place_due(gateway.app)
    finally:
        await bus.ensure_streams()


async def callback(db, callback_id: int) -> dict[str, Any]:
    cursor = await db.execute(
        "SELECT status, attempts, placed_call_id, last_error FROM tool_callbacks WHERE id = %s",
        (callback_id,))
    return dict(zip(("status", "attempts", "placed_call_id", "last_error"),
                    await cursor.fetchone(), strict=True))


async def settled(db, callback_id: int, status: str = "placed") -> dict[str, Any]:
    async def check():
        row = await callback(db, callback_id)
        return row if row["status"] == status else None

    return await wait_for(check)


async def test_a_due_callback_is_dialled_once_from_the_number_the_caller_reached(
        make_dialler, twilio_api, db, events):  # noqa: F811
    # Two gateway instances' rounds race for the same due callbacks: each is dialled by one
    # of them, once, from the agent's number of the call it was booked on, as a call whose
    # call.requested says which call and tool call it follows up.
    instances = [await make_dialler(gateway_callback_interval_s=0) for _ in range(2)]
    _, call_id, _ = await instances[0].inbound_call()
    numbers = [f"+1415555020{n}" for n in range(6)]
    ids = [await book(db, call_id, f"toolu_{n}", number=number)
           for n, number in enumerate(numbers)]
    for _ in range(2):  # the instances' rounds, at the same time
        await asyncio.gather(*(place_due(gateway.app) for gateway in instances))
    rows = [await callback(db, callback_id) for callback_id in ids]
    assert [row["status"] for row in rows] == ["placed"] * 6
    assert sorted(sent["To"] for sent in twilio_api.requests) == numbers
    assert {sent["From"] for sent in twilio_api.requests} == {CASCADING_NUMBER}
    assert [row["attempts"] for row in rows] == [1] * 6

    placed = rows[0]["placed_call_id"]
    [requested] = await events.wait("call.requested", placed)
    assert isinstance(requested, CallRequested)
    assert (requested.direction, requested.agent_id, requested.from_number,
            requested.to_number) == ("outbound", CASCADING_AGENT, CASCADING_NUMBER, numbers[0])
    assert requested.metadata == {"callback_of": call_id, "tool_call_id": "toolu_0"}
    assert requested.context == {"callback_note": "the refund for order 42"}
    await events.wait("call.dialing", placed)
    assert len(events.of("call.requested")) == 1 + 6  # the inbound call and the callbacks


async def test_a_callback_not_due_yet_is_not_dialled(make_dialler, twilio_api, db):  # noqa: F811
    gateway = await make_dialler()
    _, call_id, _ = await gateway.inbound_call()
    later = await book(db, call_id, "toolu_later", due_in_s=3600)
    now = await book(db, call_id, "toolu_now", number="+14155550201")
    await settled(db, now)
    await asyncio.sleep(0.2)
    assert [sent["To"] for sent in twilio_api.requests] == ["+14155550201"]
    assert await callback(db, later) == {"status": "pending", "attempts": 0,
                                         "placed_call_id": "", "last_error": ""}


async def test_a_number_the_carrier_refuses_fails_the_callback(
        make_dialler, twilio_api, db, events):  # noqa: F811
    # Twilio refuses the number itself (21211): trying again would not help.
    twilio_api.fail_with = NUMBER_FAULT
    gateway = await make_dialler()
    _, call_id, _ = await gateway.inbound_call()
    refused = await book(db, call_id, "toolu_1")
    row = await settled(db, refused, "failed")
    assert row["attempts"] == 1 and "is not a valid phone number" in row["last_error"]
    [failed] = await events.wait("call.failed", row["placed_call_id"])
    assert isinstance(failed, CallFailed) and failed.carrier_status == "21211"
    # A callback booked on a call the gateway never had has no number to call from.
    unknown = await book(db, "call_unknown", "toolu_2")
    row = await settled(db, unknown, "failed")
    assert "call_unknown" in row["last_error"] and row["placed_call_id"] == ""
    await asyncio.sleep(0.2)
    assert len(twilio_api.requests) == 1
    assert gateway.metric("gateway_callbacks_total", outcome="failed") == 2


async def test_a_carrier_outage_is_retried_with_backoff_then_fails(
        make_dialler, twilio_api, db, events):  # noqa: F811
    twilio_api.fail_with = OUTAGE
    gateway = await make_dialler(gateway_callback_retry_s=1.0)
    _, call_id, _ = await gateway.inbound_call()
    retried = await book(db, call_id, "toolu_1")
    await wait_for(lambda: len(twilio_api.requests) == 1)
    await asyncio.sleep(0.3)  # within the backoff: not dialled again yet
    assert len(twilio_api.requests) == 1
    row = await callback(db, retried)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "Internal Server Error" in row["last_error"]
    twilio_api.fail_with = None  # Twilio is back
    row = await settled(db, retried)
    assert row["attempts"] == 2 and len(twilio_api.requests) == 2

    twilio_api.fail_with = OUTAGE  # down for good: three attempts, then failed
    down = await book(db, call_id, "toolu_2", number="+14155550201")
    row = await settled(db, down, "failed")
    assert row["attempts"] == 3 and "Internal Server Error" in row["last_error"]
    assert len(twilio_api.requests) == 2 + 3
    assert len(events.of("call.failed")) == 1 + 3  # one call per attempt


async def test_callbacks_keep_to_the_orgs_call_rate(make_dialler, twilio_api, db):  # noqa: F811
    gateway = await make_dialler(gateway_call_rate_per_s=0.001, gateway_call_burst=1)
    _, call_id, _ = await gateway.inbound_call()
    first = await book(db, call_id, "toolu_1")
    await settled(db, first)
    second = await book(db, call_id, "toolu_2", number="+14155550201")
    await asyncio.sleep(0.3)
    assert len(twilio_api.requests) == 1
    assert (await callback(db, second))["status"] == "pending"


async def test_an_org_over_its_call_rate_does_not_hold_back_another_orgs_callbacks(
        make_dialler, twilio_api, db):  # noqa: F811
    # Orgs have separate rate buckets so that one org's campaign never holds back another's
    # calls: a batch's worth of one org's callbacks due first, over its rate, must not keep
    # the callbacks due after them, of another org, from being dialled.
    gateway = await make_dialler(gateway_callback_interval_s=0, gateway_call_rate_per_s=0.001,
                                 gateway_call_burst=1)
    _, call_id, _ = await gateway.inbound_call()
    backlog = [await book(db, call_id, f"toolu_{n}", number=f"+141555502{n:02d}", due_in_s=-60)
               for n in range(BATCH + 1)]
    await create_org(db, "org_other", "Other")
    await create_agent(db, "org_other", "Other agent", agent_id="ag_other")
    await assign_number(db, "org_other", "+14155550177", "ag_other")
    await db.execute(
        "INSERT INTO carrier_calls (carrier, carrier_call_id, call_id, org_id, agent_id, "
        "direction, from_number, to_number) VALUES ('twilio', 'CAother', 'call_other', "
        "'org_other', 'ag_other', 'inbound', '+14155550188', '+14155550177')")
    other = await book(db, "call_other", "toolu_other", number="+14155550188",
                       org_id="org_other", agent_id="ag_other")
    for _ in range(3):
        await place_due(gateway.app)
    assert (await callback(db, other))["status"] == "placed"
    statuses = [(await callback(db, callback_id))["status"] for callback_id in backlog]
    assert statuses == ["placed"] + ["pending"] * BATCH  # the first org: one, its burst
    assert [sent["From"] for sent in twilio_api.requests] == [CASCADING_NUMBER, "+14155550177"]


async def test_a_callback_left_dialing_by_a_dead_instance_is_not_dialled_again(
        make_dialler, twilio_api, db):  # noqa: F811
    # An instance claimed it and died mid-dial: the carrier may have placed the call, so it is
    # never dialled again; it is failed, saying so, unless its call reached carrier_calls.
    gateway = await make_dialler()
    _, call_id, _ = await gateway.inbound_call()
    lost = await book(db, call_id, "toolu_1")
    await db.execute("UPDATE tool_callbacks SET status = 'dialing', attempts = 1, "
                     "placed_call_id = 'call_lost', updated_at = now() - interval '10 minutes' "
                     "WHERE id = %s", (lost,))
    row = await settled(db, lost, "failed")
    assert "interrupted" in row["last_error"]
    assert twilio_api.requests == []


async def test_callbacks_claimed_but_not_dialled_when_the_gateway_stops_are_dialled_later(
        make_dialler, twilio_api, db):  # noqa: F811
    # A round claims a batch, then the gateway stops (a deploy) while the first is being
    # dialled: that one may have reached the carrier and stays dialing, but the others were
    # never dialled and must not be lost with it.
    twilio_api.hold = asyncio.Event()
    gateway = await make_dialler(gateway_callback_interval_s=0)
    _, call_id, _ = await gateway.inbound_call()
    ids = [await book(db, call_id, f"toolu_{n}", number=f"+1415555020{n}", due_in_s=-3 + n)
           for n in range(3)]
    round_ = asyncio.create_task(place_due(gateway.app))
    await wait_for(lambda: len(twilio_api.requests) == 1)
    round_.cancel()  # as the app's cleanup does
    with pytest.raises(asyncio.CancelledError):
        await round_
    rows = [await callback(db, callback_id) for callback_id in ids]
    assert rows[0]["status"] == "dialing"
    assert [(row["status"], row["attempts"]) for row in rows[1:]] == [("pending", 0)] * 2

    twilio_api.hold.set()
    another = await make_dialler()  # the next instance dials them
    await settled(db, ids[1])
    await settled(db, ids[2])
    assert sorted(sent["To"] for sent in twilio_api.requests) == [
        "+14155550200", "+14155550201", "+14155550202"]
    assert another.metric("gateway_callbacks_total", outcome="placed") == 2


async def test_a_callback_nats_could_not_take_is_dialled_once_it_can(
        make_dialler, twilio_api, db, bus):  # noqa: F811
    # call.requested could not be published (JetStream had no stream to store it: NATS
    # unavailable), so the carrier was never asked: the callback is not lost as "interrupted"
    # two minutes later, it waits for a round that can place it.
    gateway = await make_dialler(gateway_callback_interval_s=0)
    _, call_id, _ = await gateway.inbound_call()
    due = await book(db, call_id, "toolu_1")
    assert await place_due_while_nats_cannot_store(gateway, bus) == 1
    assert twilio_api.requests == []
    row = await callback(db, due)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    await place_due(gateway.app)
    row = await callback(db, due)
    assert (row["status"], row["attempts"]) == ("placed", 1)
    assert [sent["To"] for sent in twilio_api.requests] == [CALLER]


async def test_a_callback_nats_could_not_take_takes_nothing_from_the_orgs_rate_limit(
        make_dialler, twilio_api, db, bus):  # noqa: F811
    # The org's last token of its burst went to a callback that was not dialled (NATS could
    # not take call.requested): the rows were released, the token was not, so once NATS was
    # back the callback (and the org's POST /v1/calls) waited for a refill of a call nobody
    # placed; a NATS outage drained the org's bucket round after round. POST /v1/calls gives
    # the token of a call not dialled back (db8ebb3); the callbacks did not.
    gateway = await make_dialler(gateway_callback_interval_s=0, gateway_call_rate_per_s=0.001,
                                 gateway_call_burst=1)
    _, call_id, _ = await gateway.inbound_call()
    due = await book(db, call_id, "toolu_1")
    assert await place_due_while_nats_cannot_store(gateway, bus) == 1
    assert twilio_api.requests == []
    assert await place_due(gateway.app) == 1
    row = await callback(db, due)
    assert (row["status"], row["attempts"]) == ("placed", 1)
    assert [sent["To"] for sent in twilio_api.requests] == [CALLER]


async def test_a_callback_the_agent_no_longer_allows_takes_nothing_from_the_orgs_rate_limit(
        make_dialler, twilio_api, db):  # noqa: F811
    # Failed without being dialled (the guard narrowed since booking): its token was spent
    # all the same, and the org's next callback waited for a refill.
    gateway = await make_dialler(gateway_callback_interval_s=0, gateway_call_rate_per_s=0.001,
                                 gateway_call_burst=1)
    _, call_id, _ = await gateway.inbound_call()
    other = await book(db, call_id, "toolu_1", number="+14155550201", due_in_s=-2)
    await update_agent(db, ORG, CASCADING_AGENT, {"callback_number_prefixes": ["+1212"]})
    await place_due(gateway.app)
    assert (await callback(db, other))["status"] == "failed"
    own = await book(db, call_id, "toolu_2", number=CALLER)
    await place_due(gateway.app)
    assert (await callback(db, own))["status"] == "placed"
    assert [sent["To"] for sent in twilio_api.requests] == [CALLER]


async def test_a_late_outcome_does_not_overwrite_a_callback_settled_as_interrupted(
        make_dialler, twilio_api, db):  # noqa: F811
    # Twilio was so slow to answer that another round took the dial for interrupted and failed
    # the callback (the carrier may have placed it); Twilio's late outage answer must not put it
    # back to pending, to be dialled again.
    twilio_api.hold = asyncio.Event()
    twilio_api.fail_with = OUTAGE
    gateway = await make_dialler(gateway_callback_interval_s=0)
    _, call_id, _ = await gateway.inbound_call()
    slow = await book(db, call_id, "toolu_1")
    round_ = asyncio.create_task(place_due(gateway.app))
    await wait_for(lambda: len(twilio_api.requests) == 1)
    await db.execute("UPDATE tool_callbacks SET updated_at = now() - interval '10 minutes' "
                     "WHERE id = %s", (slow,))
    another = await make_dialler(gateway_callback_interval_s=0)
    await place_due(another.app)
    assert (await callback(db, slow))["status"] == "failed"
    twilio_api.hold.set()
    await round_
    row = await callback(db, slow)
    assert row["status"] == "failed" and "interrupted" in row["last_error"]
    await db.execute("UPDATE tool_callbacks SET retry_at = now() WHERE id = %s", (slow,))
    await place_due(gateway.app)
    assert len(twilio_api.requests) == 1


@pytest.mark.parametrize("failure", ["dropped", "timeout"])
async def test_a_callback_the_carrier_did_not_answer_for_is_not_dialled_again(
        make_dialler, twilio_api, db, failure):  # noqa: F811
    # The create request reached Twilio but no answer came back (the connection dropped, or
    # the REST client timed out): Twilio may have placed the call, so dialling again 30 s later
    # could ring the caller twice. It is settled as an interrupted dial would be.
    gateway = await make_dialler(gateway_callback_interval_s=0)
    if failure == "dropped":
        twilio_api.drop = True
    else:
        twilio_api.hold = asyncio.Event()
        gateway.app[TWILIO_REST].client.http_client.timeout = 0.2
    _, call_id, _ = await gateway.inbound_call()
    unanswered = await book(db, call_id, "toolu_1")
    await place_due(gateway.app)
    row = await callback(db, unanswered)
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    assert "may have placed the call" in row["last_error"]
    await db.execute("UPDATE tool_callbacks SET retry_at = now() WHERE id = %s", (unanswered,))
    await place_due(gateway.app)
    assert len(twilio_api.requests) == 1
    if twilio_api.hold is not None:
        twilio_api.hold.set()


async def test_a_callback_plivo_did_not_answer_for_is_not_dialled_again(
        make_plivo_gateway, db):
    # As with Twilio: the connection dropped once the create request was sent.
    plivo = await make_plivo_gateway(gateway_callback_interval_s=0)
    plivo.api.drop = True
    _, call_id, _ = await plivo.answer()
    unanswered = await book(db, call_id, "toolu_1", number=support.PLIVO_CALLER)
    await place_due(plivo.app)
    row = await callback(db, unanswered)
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    assert "may have placed the call" in row["last_error"]
    assert len(plivo.api.created) == 1


@pytest.mark.parametrize("change", ["narrowed", "deleted"])
async def test_a_callback_the_agent_no_longer_allows_is_not_dialled(
        make_dialler, twilio_api, db, events, change):  # noqa: F811
    # Booked to a number the agent's callback_number_prefixes allowed then (not the caller's
    # own); before it was due the prefixes were narrowed (or the agent deleted), say because
    # callers were talking it into numbers at the org's expense. It was dialled all the same:
    # the guard was checked only at booking. Now it is failed, saying why, and the caller's
    # own number, which needs no prefix, is still called back.
    gateway = await make_dialler(gateway_callback_interval_s=0)
    _, call_id, _ = await gateway.inbound_call()
    other = await book(db, call_id, "toolu_1", number="+14155550201")
    own = await book(db, call_id, "toolu_2", number=CALLER)
    if change == "narrowed":
        await update_agent(db, ORG, CASCADING_AGENT, {"callback_number_prefixes": ["+1212"]})
    else:
        await db.execute("UPDATE agents SET deleted_at = now() WHERE agent_id = %s",
                         (CASCADING_AGENT,))
    await place_due(gateway.app)
    row = await callback(db, other)
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    expected = ("not allowed for this agent any more" if change == "narrowed"
                else "no longer exists")
    assert expected in row["last_error"]
    assert [sent["To"] for sent in twilio_api.requests] == (
        [CALLER] if change == "narrowed" else [])
    assert not events.of("call.requested", row["placed_call_id"])
    if change == "narrowed":
        assert (await callback(db, own))["status"] == "placed"
        assert "+1212" in row["last_error"] and CALLER in row["last_error"]


@pytest.mark.parametrize(("table", "when"), [("carrier_calls", "true"),
                                             ("tool_callbacks", "NEW.status = 'placed'")])
async def test_a_dialled_callback_is_placed_though_its_database_connection_dropped(
        make_dialler, twilio_api, db, events, table, when):  # noqa: F811
    # The carrier placed the call, and then the gateway lost its connection to Postgres (a
    # restart) while recording the carrier's id (carrier_calls) or the callback's outcome.
    # The row was left dialing, the outcome lost: two minutes later it was settled as
    # interrupted, failed (no carrier_calls row) though the callee's phone had rung, or the
    # round failed. Now both writes are retried: the callback is placed, its call recorded,
    # and it is never dialled again.
    gateway = await make_dialler(gateway_callback_interval_s=0)
    # (a sid of its own: Twilio's stand-in numbers the calls it places from 1 too)
    _, call_id, _ = await gateway.inbound_call(call_sid="CA" + "f" * 32)
    due = await book(db, call_id, "toolu_1")
    await drop_connection(db, table, when)
    await place_due(gateway.app)
    cursor = await db.execute(f"SELECT is_called FROM dropped_{table}")
    assert (await cursor.fetchone())[0]  # the connection was dropped
    row = await callback(db, due)
    assert (row["status"], row["attempts"], row["last_error"]) == ("placed", 1, ""), row
    cursor = await db.execute("SELECT carrier_call_id FROM carrier_calls WHERE call_id = %s",
                              (row["placed_call_id"],))
    assert await cursor.fetchone() is not None
    await events.wait("call.dialing", row["placed_call_id"])
    assert gateway.metric("gateway_callbacks_total", outcome="placed") == 1
    # Later rounds, past the time a dial is taken for interrupted: the outcome stands.
    await db.execute("UPDATE tool_callbacks SET updated_at = now() - interval '10 minutes', "
                     "retry_at = now() WHERE id = %s", (due,))
    await place_due(gateway.app)
    assert await callback(db, due) == row
    assert len(twilio_api.requests) == 1
    assert len(events.of("call.dialing", row["placed_call_id"])) == 1


async def test_a_dialled_callback_that_could_not_be_recorded_at_all_is_placed_and_says_so(
        make_dialler, twilio_api, db, monkeypatch):  # noqa: F811
    # Recording the carrier's id lost its connection on every try: the carrier is dialling all
    # the same, so the callback is placed (its last_error says what was not recorded), not
    # left to be taken for interrupted and failed, and not dialled again.
    monkeypatch.setattr(outbound, "RECORD_RETRY_DELAYS_S", (0.05, 0.05))
    gateway = await make_dialler(gateway_callback_interval_s=0)
    _, call_id, _ = await gateway.inbound_call(call_sid="CA" + "f" * 32)
    due = await book(db, call_id, "toolu_1")
    await drop_connection(db, "carrier_calls", times=3)
    await place_due(gateway.app)
    row = await callback(db, due)
    assert (row["status"], row["attempts"]) == ("placed", 1), row
    assert "twilio is dialling" in row["last_error"]
    assert "recording it failed" in row["last_error"]
    await db.execute("UPDATE tool_callbacks SET updated_at = now() - interval '10 minutes', "
                     "retry_at = now() WHERE id = %s", (due,))
    await place_due(gateway.app)
    assert await callback(db, due) == row
    assert len(twilio_api.requests) == 1
