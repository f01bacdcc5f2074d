import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from parley.common.configuration import (
    assign_number,
    create_agent,
    create_api_key,
    create_org,
)
from parley.gateway import outbound
from parley.gateway.api.rate_limit import CallRateLimiter
from parley.gateway.api.schemas import MAX_BODY_BYTES
from parley.gateway.calls import find_by_call_id

from . import test_plivo_support as support
from .conftest import ACCOUNT, CASCADING_AGENT, CASCADING_NUMBER, MANAGED_AGENT, ORG, PUBLIC
from .test_plivo_support import (
    PLIVO_NUMBER,
    PlivoStreamClient,
    new_call_uuid,
)

CALLEE = "+14155550123"
OTHER_ORG, OTHER_AGENT, OTHER_NUMBER = "org_other", "ag_other", "+14155550177"

# the shared Plivo fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number


@dataclass
class FakeTwilioCalls:
    """Twilio's Calls create endpoint, minimal: records the form the SDK sent."""

    requests: list[MultiDict] = field(default_factory=list)
    fail_with: tuple[int, dict[str, Any]] | None = None
    hold: asyncio.Event | None = None  # set: answers wait until it is set
    drop: bool = False  # the connection is closed once a request is read: no answer

    def app(self) -> web.Application:
        app = web.Application()

        async def create(request: web.Request) -> web.Response:
            form = MultiDict((key, str(value)) for key, value in (await request.post()).items())
            self.requests.append(form)
            if self.hold is not None:
                await self.hold.wait()
            if self.drop and request.transport is not None:
                request.transport.close()
            if self.fail_with is not None:
                return web.json_response(self.fail_with[1], status=self.fail_with[0])
            sid = f"CA{len(self.requests):032x}"
            return web.json_response({
                "sid": sid, "account_sid": request.match_info["account"], "to": form["To"],
                "from": form["From"], "status": "queued", "direction": "outbound-api",
                "api_version": "2010-04-01",
                "uri": f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json"}, status=201)

        app.router.add_post("/2010-04-01/Accounts/{account}/Calls.json", create)
        return app


@pytest.fixture
async def twilio_api():
    fake = FakeTwilioCalls()
    server = TestClient(TestServer(fake.app()))
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake
    await server.close()


@pytest.fixture
async def api(make_plivo_gateway, twilio_api):
    """A gateway with both carriers pointed at stand-ins."""
    return await make_plivo_gateway(twilio_account_sid=ACCOUNT,
                                    twilio_api_base_url=twilio_api.url)


@pytest.fixture
async def keys(db, configured):
    """API keys: full, write-only, read-only, and another org's (with its own agent/number)."""
    await create_org(db, OTHER_ORG, "Other")
    await create_agent(db, OTHER_ORG, "Other agent", agent_id=OTHER_AGENT)
    await assign_number(db, OTHER_ORG, OTHER_NUMBER, OTHER_AGENT)
    _, full = await create_api_key(db, ORG, scopes=["calls:write", "calls:read"])
    _, write = await create_api_key(db, ORG, scopes=["calls:write"])
    _, read = await create_api_key(db, ORG, scopes=["calls:read"])
    _, other = await create_api_key(db, OTHER_ORG)
    return {"full": full, "write": write, "read": read, "other": other}


async def place(api, key: str | None, body: Any):
    headers = {} if key is None else {"X-API-Key": key}
    if isinstance(body, bytes):
        return await api.gateway.client.post("/v1/calls", data=body, headers={
            **headers, "Content-Type": "application/json"})
    return await api.gateway.client.post("/v1/calls", json=body, headers=headers)


async def drop_connection(db, table: str, when: str = "true", *, times: int = 1) -> None:
    """The first ``times`` writes to ``table`` (where ``when`` holds of NEW) lose their
    connection, as they would if Postgres restarted at that moment: the backend is terminated
    mid-statement. ``dropped_<table>`` counts them."""
    await db.execute(f"""
        CREATE SEQUENCE dropped_{table};
        CREATE FUNCTION drop_connection_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {when} THEN
                IF nextval('dropped_{table}') <= {times} THEN
                    PERFORM pg_terminate_backend(pg_backend_pid());
                END IF;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER drop_connection BEFORE INSERT OR UPDATE ON {table}
            FOR EACH ROW EXECUTE FUNCTION drop_connection_{table}();""")


def nested(levels: int) -> list[Any]:
    """A list ``levels`` deep: ``[[...[]...]]``."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def body(**changes: Any) -> dict[str, Any]:
    return {"agent_id": CASCADING_AGENT, "to": CALLEE, "from": CASCADING_NUMBER, **changes}


async def test_place_a_twilio_call(api, twilio_api, keys, events, db):
    response = await place(api, keys["full"], body(context={"name": "Ada"},
                                                    metadata={"crm_id": "42"}))
    assert response.status == 201, await response.text()
    created = await response.json()
    call_id = created["call_id"]
    assert created == {"call_id": call_id, "status": "dialing"}
    assert response.headers["Location"] == f"/v1/calls/{call_id}"

    [sent] = twilio_api.requests
    ids = f"call_id={call_id}&org_id={ORG}&agent_id={CASCADING_AGENT}"
    assert (sent["To"], sent["From"]) == (CALLEE, CASCADING_NUMBER)
    assert sent["Url"] == f"{PUBLIC}/twilio/voice?{ids}"
    assert sent["StatusCallback"] == f"{PUBLIC}/twilio/status?{ids}"
    assert sent.getall("StatusCallbackEvent") == ["initiated", "ringing", "answered",
                                                  "completed"]
    assert (sent["MachineDetection"], sent["AsyncAmd"]) == ("Enable", "true")
    assert sent["AsyncAmdStatusCallback"] == f"{PUBLIC}/twilio/amd?{ids}"
    assert sent["Record"] == "true"
    assert sent["RecordingStatusCallback"] == f"{PUBLIC}/twilio/recording?{ids}"
    assert sent["TimeLimit"] == "60"

    requested, dialing = (await events.wait("call.requested", call_id))[0], (
        await events.wait("call.dialing", call_id))[0]
    assert events.items.index(requested) < events.items.index(dialing)
    assert (requested.direction, requested.carrier, requested.agent_id) == (
        "outbound", "twilio", CASCADING_AGENT)
    assert (requested.from_number, requested.to_number) == (CASCADING_NUMBER, CALLEE)
    assert (requested.context, requested.metadata) == ({"name": "Ada"}, {"crm_id": "42"})
    assert dialing.carrier_call_id == f"CA{1:032x}"
    call = await find_by_call_id(db, call_id)
    assert call is not None and (call.carrier_call_id, call.direction) == (
        dialing.carrier_call_id, "outbound")

    # before the recorder has projected it, GET answers from the gateway's own bookkeeping
    response = await api.gateway.client.get(f"/v1/calls/{call_id}",
                                            headers={"X-API-Key": keys["full"]})
    view = await response.json()
    assert (view["state"], view["from"], view["to"], view["carrier"]) == (
        "dialing", CASCADING_NUMBER, CALLEE, "twilio")

    # the callee picks up: Twilio requests the Url we gave it, and the call connects
    answered = await api.gateway.post(urlsplit(sent["Url"]).path + "?" + ids, {
        "CallSid": dialing.carrier_call_id, "AccountSid": ACCOUNT, "From": CASCADING_NUMBER,
        "To": CALLEE, "Direction": "outbound-api", "CallStatus": "in-progress"})
    assert answered.status == 200
    await events.wait("call.answered", call_id)


async def test_place_a_plivo_call_and_follow_it(api, keys, events, db):
    response = await place(api, keys["full"], body(**{"from": PLIVO_NUMBER}))
    assert response.status == 201, await response.text()
    call_id = (await response.json())["call_id"]
    [sent] = api.api.created
    ids = f"call_id={call_id}&org_id={ORG}&agent_id={CASCADING_AGENT}"
    assert (sent["from"], sent["to"], sent["time_limit"]) == (PLIVO_NUMBER, CALLEE, 60)
    assert sent["answer_url"] == f"{PUBLIC}/plivo/answer?{ids}"
    assert sent["hangup_url"] == f"{PUBLIC}/plivo/hangup?{ids}"
    assert sent["ring_url"] == f"{PUBLIC}/plivo/ring?{ids}"
    assert api.api.auth[0].startswith("Basic ")
    [dialing] = await events.wait("call.dialing", call_id)
    assert dialing.carrier_call_id == "req-1"
    [requested] = events.of("call.requested", call_id)
    assert requested.carrier == "plivo"

    call_uuid = new_call_uuid()
    params = {"CallUUID": call_uuid, "RequestUUID": "req-1", "From": PLIVO_NUMBER,
              "To": CALLEE, "Direction": "outbound"}
    ring = await api.post(f"/plivo/ring?{ids}", {**params, "CallStatus": "ringing"})
    assert ring.status == 204
    await events.wait("call.ringing", call_id)
    call = await find_by_call_id(db, call_id)
    assert call is not None and call.carrier_call_id == call_uuid  # re-keyed to the CallUUID
    _, streamed, root = await api.answer(call_uuid=call_uuid, path=f"/plivo/answer?{ids}",
                                         Direction="outbound", RequestUUID="req-1")
    assert streamed == call_id and root.find("Stream") is not None
    await events.wait("call.answered", call_id)
    stream = PlivoStreamClient(await api.ws(call_id))
    await stream.start(call_uuid)
    await events.wait("call.stream_started", call_id)
    await api.post(f"/plivo/hangup?{ids}", {**params, "CallStatus": "completed",
                                            "Duration": "12", "HangupSource": "Callee"})
    [ended] = await events.wait("call.ended", call_id)
    assert (ended.reason, ended.duration_s) == ("caller_hangup", 12.0)
    await stream.ws.close()


async def test_a_retried_first_answer_of_a_plivo_call_we_placed_is_no_reconnect(
        make_plivo_gateway, twilio_api, keys, events):
    # Our first answer was slow and Plivo asked the answer URL we dialled with (which names
    # the call, as every URL of an outbound call does) again: the retry was taken for a
    # reconnect and used up the call's one allowed reconnect before its socket ever dropped.
    api = await make_plivo_gateway(twilio_account_sid=ACCOUNT,
                                   twilio_api_base_url=twilio_api.url, max_reconnects=1)
    response = await place(api, keys["full"], body(**{"from": PLIVO_NUMBER}))
    call_id = (await response.json())["call_id"]
    [sent] = api.api.created
    call_uuid = new_call_uuid()
    answer = urlsplit(sent["answer_url"])
    for _ in range(2):
        _, streamed, root = await api.answer(
            call_uuid=call_uuid, path=f"{answer.path}?{answer.query}", Direction="outbound",
            RequestUUID="req-1")
        assert streamed == call_id and root.find("Stream") is not None
    # the socket drops: the <Redirect> reconnects the call, once
    redirect = urlsplit(root.find("Redirect").text)
    _, _, root = await api.answer(call_uuid=call_uuid, path=f"{redirect.path}?{redirect.query}",
                                  Direction="outbound", RequestUUID="req-1")
    assert root.find("Stream") is not None
    assert not events.of("call.ended", call_id)
    assert len(events.of("call.answered", call_id)) == 1


async def test_an_unanswered_plivo_call_fails(api, keys, events):
    response = await place(api, keys["full"], body(**{"from": PLIVO_NUMBER}))
    call_id = (await response.json())["call_id"]
    ids = f"call_id={call_id}&org_id={ORG}&agent_id={CASCADING_AGENT}"
    await api.post(f"/plivo/hangup?{ids}", {"CallUUID": new_call_uuid(), "RequestUUID": "req-1",
                                            "CallStatus": "no-answer", "Duration": "0"})
    [failed] = await events.wait("call.failed", call_id)
    assert (failed.reason, failed.carrier_status) == ("no_answer", "no-answer")


@pytest.mark.parametrize(("key", "status", "kind"), [
    (None, 401, "missing-api-key"),
    ("pk_0123456789abcdef_wrong", 401, "invalid-api-key"),
    ("not-a-key", 401, "invalid-api-key"),
    ("read", 403, "insufficient-scope"),
])
async def test_authentication_failures(api, twilio_api, keys, events, key, status, kind):
    response = await place(api, keys.get(key, key), body())
    assert response.status == status
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert (problem["status"], problem["type"].rsplit("/", 1)[1]) == (status, kind)
    assert twilio_api.requests == [] and events.of("call.requested") == []


async def test_a_key_that_is_not_utf8_is_a_401(api, keys):
    # Raw bytes: aiohttp reads a header's undecodable bytes as surrogates, which Postgres
    # cannot take (a 500 with a traceback for anyone who sent one).
    server = api.gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /v1/calls/call_1 HTTP/1.1\r\nHost: gateway\r\n"
                 b"X-API-Key: pk_\xff\xfe_secret\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, problem = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(problem)["type"].endswith("/invalid-api-key")


@pytest.mark.parametrize(("payload", "field", "words"), [
    (body(to=15551234567), "to", "Expected `str`, got `int`"),
    ({"agent_id": CASCADING_AGENT, "to": CALLEE}, "from", "missing required field"),
    (body(surprise=1), "surprise", "unknown field"),
    (body(agent_id="no spaces"), "agent_id", "regex"),
    (body(metadata={"n": 1}), "metadata", "Expected `str`"),
    (body(to="4155550123"), "to", "not an E.164 number"),
    (body(to="+1 415 555 0123"), "to", "not an E.164 number"),
    (body(to=CALLEE + "\n"), "to", "not an E.164 number"),
    (body(to=CASCADING_NUMBER + "\n"), "to", "not an E.164 number"),  # the self-call check
    (body(to="+1415\uff15\uff15\uff150123"), "to", "not an E.164 number"),  # fullwidth 5s
    (body(**{"from": CASCADING_NUMBER + "\n"}), "from", "not an E.164 number"),
    (body(to="+15551234567"), "to", "not a valid phone number"),
    (body(**{"from": "+1415"}), "from", "not a valid phone number"),
    (body(to=CASCADING_NUMBER), "to", "cannot call the number it calls from"),
    (body(**{"from": OTHER_NUMBER}), "from", "not one of your numbers"),
    (body(**{"from": "+14155550188"}), "from", "not one of your numbers"),
    # what Postgres jsonb refuses would cost the call its call.requested in the event store
    (body(metadata={"crm": "a\u0000b"}), "metadata", "metadata.crm contains a NUL"),
    (body(metadata={"c\u0000rm": "ab"}), "metadata", "a key in metadata contains a NUL"),
    (body(context={"a": [{"b": "\u0000"}]}), "context", "context.a[0].b contains a NUL"),
    (body(context={"a": {"\u0000": 1}}), "context", "a key in context.a contains a NUL"),
    (body(context={"a": nested(32)}), "context", "nested more than 32 levels"),
])
async def test_validation_errors_name_the_field(api, twilio_api, keys, events, payload, field,
                                                words):
    response = await place(api, keys["full"], payload)
    assert response.status == 422
    problem = await response.json()
    assert problem["field"] == field and words in problem["detail"]
    assert twilio_api.requests == [] and events.of("call.requested") == []


async def test_deeply_nested_context_is_a_422(api, twilio_api, keys, events):
    assert (await place(api, keys["full"], body(context={"a": nested(31)}))).status == 201
    deep = b'{"agent_id": "%s", "to": "%s", "from": "%s", "context": {"a": %s%s}}' % (
        CASCADING_AGENT.encode(), CALLEE.encode(), CASCADING_NUMBER.encode(),
        b"[" * 30_000, b"]" * 30_000)
    response = await place(api, keys["full"], deep)
    assert response.status == 422
    assert "nested too deeply" in (await response.json())["detail"]
    assert len(twilio_api.requests) == 1 and len(events.of("call.requested")) == 1


async def test_a_body_over_the_cap_is_a_413_even_without_a_content_length(api, twilio_api,
                                                                         keys, events):
    # Sent in chunks, the body has no Content-Length to refuse it by before it is read.
    data = json.dumps(body(context={"notes": "a" * MAX_BODY_BYTES})).encode()

    async def chunks():
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]

    response = await api.gateway.client.post("/v1/calls", data=chunks(), headers={
        "X-API-Key": keys["full"], "Content-Type": "application/json"})
    assert response.status == 413
    assert response.content_type == "application/problem+json"
    assert not twilio_api.requests and not events.of("call.requested")


async def test_malformed_json_is_a_400(api, keys):
    response = await place(api, keys["full"], b'{"agent_id": ')
    assert response.status == 400
    assert (await response.json())["type"].endswith("malformed-json")


async def test_another_orgs_agent_is_not_found(api, twilio_api, keys):
    response = await place(api, keys["full"], body(agent_id=OTHER_AGENT))
    assert response.status == 404
    response = await place(api, keys["other"], body())  # our agent, their key
    assert response.status == 404
    assert twilio_api.requests == []


@pytest.mark.parametrize(("status", "error", "expected"), [
    (400, {"code": 21211, "message": "The 'To' number +14155550123 is not a valid phone "
           "number.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400},
     422),
    (401, {"code": 20003, "message": "Authenticate", "status": 401}, 502),
    (500, {"code": 20500, "message": "Internal Server Error", "status": 500}, 502),
])
async def test_twilio_errors(api, twilio_api, keys, events, status, error, expected):
    twilio_api.fail_with = (status, error)
    response = await place(api, keys["full"], body())
    assert response.status == expected
    problem = await response.json()
    assert error["message"] in problem["detail"]
    [failed] = await events.wait("call.failed", problem["call_id"])
    assert error["message"] in failed.reason and failed.carrier_status == str(error["code"])
    assert events.of("call.dialing") == []


@pytest.mark.parametrize(("status", "expected"), [(400, 422), (401, 502)])
async def test_plivo_errors(api, keys, events, status, expected):
    api.api.fail_with = (status, {"api_id": "x", "error": "invalid destination number"})
    response = await place(api, keys["full"], body(**{"from": PLIVO_NUMBER}))
    assert response.status == expected
    problem = await response.json()
    assert "invalid destination number" in problem["detail"]
    await events.wait("call.failed", problem["call_id"])


async def test_an_unconfigured_carrier_is_503(make_plivo_gateway, keys, events):
    gateway = await make_plivo_gateway()  # no Twilio account
    response = await place(gateway, keys["full"], body())
    assert response.status == 503
    [failed] = await events.wait("call.failed")
    assert "no Twilio account" in failed.reason


async def _project(db, call_id: str, org_id: str, agent_id: str, **columns: Any) -> None:
    values = {"call_id": call_id, "org_id": org_id, "agent_id": agent_id,
              "direction": "outbound", "from_number": CASCADING_NUMBER, "to_number": CALLEE,
              "carrier": "twilio", "carrier_call_id": "CA1", "state": "ended",
              "end_reason": "completed", "duration_s": 31.5, "turns": 4, "last_position": 9,
              **columns}
    names = ", ".join(values)
    await db.execute(f"INSERT INTO calls ({names}, requested_at, answered_at, ended_at) "
                     f"VALUES ({', '.join(['%s'] * len(values))}, now(), now(), now())",
                     list(values.values()))


async def test_get_reads_the_projection_scoped_to_the_org(api, keys, db):
    await _project(db, "call_ours", ORG, MANAGED_AGENT)
    await _project(db, "call_theirs", OTHER_ORG, OTHER_AGENT)
    response = await api.gateway.client.get("/v1/calls/call_ours",
                                            headers={"X-API-Key": keys["read"]})
    assert response.status == 200
    view = await response.json()
    assert (view["call_id"], view["agent_id"], view["state"], view["duration_s"],
            view["turns"], view["from"], view["to"]) == (
        "call_ours", MANAGED_AGENT, "ended", 31.5, 4, CASCADING_NUMBER, CALLEE)
    assert view["ended_at"].endswith(("Z", "+00:00"))
    for key, call_id in (("read", "call_theirs"), ("other", "call_ours"),
                         ("read", "call_nope"), ("read", "bad id!")):
        response = await api.gateway.client.get(f"/v1/calls/{call_id}",
                                                headers={"X-API-Key": keys[key]})
        assert response.status == 404, (key, call_id)
        assert response.content_type == "application/problem+json"
    response = await api.gateway.client.get("/v1/calls/call_ours",
                                            headers={"X-API-Key": keys["write"]})
    assert response.status == 403
    response = await api.gateway.client.get("/v1/calls/call_ours")
    assert response.status == 401


async def test_get_does_not_show_another_orgs_pending_call(api, twilio_api, keys):
    response = await place(api, keys["full"], body())
    call_id = (await response.json())["call_id"]
    response = await api.gateway.client.get(f"/v1/calls/{call_id}",
                                            headers={"X-API-Key": keys["other"]})
    assert response.status == 404


# -- rate limit: a leaked key or a runaway loop cannot dial without bound --------------------


class FrozenClock:
    """The gateway's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def other_body() -> dict[str, Any]:
    return {"agent_id": OTHER_AGENT, "to": CALLEE, "from": OTHER_NUMBER}


async def test_calls_over_the_orgs_rate_limit_are_429_and_dial_nothing(
        make_plivo_gateway, twilio_api, keys, events):
    clock = FrozenClock()
    api = await make_plivo_gateway(twilio_account_sid=ACCOUNT, twilio_api_base_url=twilio_api.url,
                                   gateway_call_rate_per_s=0.25, gateway_call_burst=2,
                                   clock=clock)
    for _ in range(2):  # the burst
        assert (await place(api, keys["full"], body())).status == 201
    response = await place(api, keys["write"], body())  # another key of the same org

    assert response.status == 429
    assert response.headers["Retry-After"] == "4"  # one call per 4 s
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == 429 and problem["title"] == "Too Many Requests"
    assert problem["type"].endswith("/rate-limited") and problem["retry_after_s"] == 4
    assert "0.25 calls per second" in problem["detail"]
    assert len(twilio_api.requests) == 2  # nothing dialled
    await events.wait("call.dialing", count=2)
    assert len(events.of("call.requested")) == 2 and not events.of("call.failed")
    assert api.gateway.metric("gateway_api_calls_placed_total", outcome="rate_limited") == 1

    # another org's calls are not held back by this one's burst
    response = await place(api, keys["other"], other_body())
    assert response.status == 201, await response.text()

    # the bucket refills at the sustained rate; a refusal took nothing from it
    clock.advance(3)
    response = await place(api, keys["full"], body())
    assert (response.status, response.headers["Retry-After"]) == (429, "1")
    clock.advance(1)
    assert (await place(api, keys["full"], body())).status == 201
    assert (await place(api, keys["full"], body())).status == 429
    clock.advance(3600)  # a long pause refills the burst, no more
    for expected in (201, 201, 429):
        assert (await place(api, keys["full"], body())).status == expected
    assert len(twilio_api.requests) == 6
    assert api.gateway.metric("gateway_api_calls_placed_total", outcome="rate_limited") == 4


def test_a_wall_clock_stepped_back_does_not_freeze_an_orgs_bucket():
    """The buckets run on the gateway's wall clock. When it steps back (an NTP correction, a VM
    restored or migrated), the time the bucket last refilled is in the future: it was kept
    there, so nothing refilled until the clock caught up with it (an hour's step: an hour of
    429s for a drained org, each saying Retry-After: 1). The refill now goes on from the
    clock's new time, the step itself refilling nothing."""
    clock = FrozenClock()
    limiter = CallRateLimiter(rate_per_s=5.0, burst=2, clock=clock)
    assert limiter.take(ORG) == limiter.take(ORG) == 0.0  # the burst is spent
    assert 0 < limiter.take(ORG) <= 0.2

    clock.advance(-3600)  # NTP steps the clock back an hour
    assert 0 < limiter.take(ORG) <= 0.2  # the step refilled nothing
    clock.advance(10)  # ten seconds later: fifty calls' worth, the burst's two kept
    assert limiter.take(ORG) == limiter.take(ORG) == 0.0
    assert limiter.take(ORG) > 0


async def test_a_rate_of_zero_places_calls_without_limit(make_plivo_gateway, twilio_api, keys):
    api = await make_plivo_gateway(twilio_account_sid=ACCOUNT, twilio_api_base_url=twilio_api.url,
                                   gateway_call_rate_per_s=0, gateway_call_burst=1,
                                   clock=FrozenClock())
    for _ in range(4):
        assert (await place(api, keys["full"], body())).status == 201
    assert len(twilio_api.requests) == 4


async def test_a_call_twilio_never_answered_for_is_still_a_502(api, twilio_api, keys, events):
    # The connection dropped once the request was sent: Twilio may have placed the call
    # (DialError.ambiguous, which a due callback is not dialled again after), but the API's
    # answer stays the carrier-error one.
    twilio_api.drop = True
    response = await place(api, keys["full"], body())
    assert response.status == 502
    problem = await response.json()
    assert problem["type"].endswith("carrier-error")
    assert problem["detail"] == "twilio could not place the call: Server disconnected"
    await events.wait("call.failed", problem["call_id"])


async def test_a_call_the_carrier_placed_is_201_though_it_could_not_be_recorded(
        api, twilio_api, keys, events, db, monkeypatch):
    # Twilio placed the call, but Postgres kept dropping the connection that recorded it
    # (carrier_calls) past the retries. The answer was a 500, and an integrator that retries a
    # 500 would ring the callee a second time. The carrier is dialling: the answer is 201.
    monkeypatch.setattr(outbound, "RECORD_RETRY_DELAYS_S", (0.05, 0.05))
    await drop_connection(db, "carrier_calls", times=3)
    response = await place(api, keys["full"], body())
    assert response.status == 201, await response.text()
    call_id = (await response.json())["call_id"]
    cursor = await db.execute("SELECT last_value FROM dropped_carrier_calls")
    assert (await cursor.fetchone())[0] == 3  # every try lost its connection
    assert len(twilio_api.requests) == 1
    await events.wait("call.requested", call_id)
