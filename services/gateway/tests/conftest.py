import asyncio
import base64
import itertools
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import msgspec
import psycopg
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from twilio.request_validator import RequestValidator

from parley.common.configuration import AgentSettings, assign_number, create_agent, create_org
from parley.common.events import Event, decode
from parley.common.metrics import Metrics
from parley.devkit.infra import NatsServer
from parley.gateway.app import create_app
from parley.gateway.config import GatewayConfig
from parley.gateway.keys import CALLS
from parley.gateway.twilio.rest import TwilioCalls

TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT = "AC" + "0" * 32
PUBLIC = "https://voice.example.com"
PUBLIC_WS = "wss://voice.example.com"
ORG = "org_acme"
CASCADING_AGENT, CASCADING_NUMBER = "ag_cascading", "+14155550100"
MANAGED_AGENT, MANAGED_NUMBER = "ag_managed", "+14155550101"
CALLER = "+14155559999"
_sids = itertools.count(1)
# The latest <Connect> the gateway handed out for each call (call ids are unique across tests):
# its one-time stream token and its action path, as Twilio would use them
_stream_tokens: dict[str, str] = {}
_actions: dict[str, str] = {}


def remember_connects(twiml: str) -> None:
    """Note the stream token and action URL of each <Connect> in a TwiML document."""
    if "<Connect" not in twiml:
        return
    root = ElementTree.fromstring(twiml)
    for connect in root.iter("Connect"):
        params = {p.get("name"): p.get("value") for p in connect.iter("Parameter")}
        call_id = params.get("call_id", "")
        if call_id:
            _stream_tokens[call_id] = params.get("stream_token", "")
            _actions[call_id] = (connect.get("action") or "").removeprefix(PUBLIC)


def stream_token(call_id: str) -> str:
    """The stream token of the call's latest <Connect> ("" if none was handed out)."""
    return _stream_tokens.get(call_id, "")


def reconnect_path(call_id: str) -> str:
    """The <Connect action> path (and query) of the call's latest <Connect>."""
    return _actions[call_id]


async def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll an (async or sync) predicate until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def new_call_sid() -> str:
    return f"CA{next(_sids):032x}"


def sign(url: str, params: dict[str, str] | None = None) -> str:
    return RequestValidator(TOKEN).compute_signature(url, params or {})


class Events:
    """Every event published while the test runs, in arrival order."""

    def __init__(self) -> None:
        self.items: list[Event] = []

    def of(self, event_type: str, call_id: str | None = None) -> list[Event]:
        return [e for e in self.items if e.type == event_type
                and (call_id is None or getattr(e, "call_id", None) == call_id)]

    async def wait(self, event_type: str, call_id: str | None = None, count: int = 1,
                   timeout: float = 10.0) -> list[Event]:
        await wait_for(lambda: len(self.of(event_type, call_id)) >= count, timeout)
        return self.of(event_type, call_id)


@pytest.fixture
def nats_server_of_test(tmp_path):
    """A nats-server of the test's own (for a test that kills it and starts it again on the
    same port and store), instead of the session's."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def events(bus):
    collected = Events()

    async def on_message(msg):
        collected.items.append(decode(msg.data))

    sub = await bus.nc.subscribe("parley.ev.>", cb=on_message)
    yield collected
    if not bus.nc.is_closed:  # (a test may close the bus, as a stopping service does)
        await sub.unsubscribe()


@pytest.fixture
async def db(database_url):
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def configured(db):
    """One org with a cascading agent and a managed agent, each on a number."""
    await create_org(db, ORG, "Acme")
    await create_agent(db, ORG, "Cascading", AgentSettings(max_duration_s=60),
                       agent_id=CASCADING_AGENT)
    await create_agent(db, ORG, "Managed", AgentSettings(
        pipeline="managed", voice="en-US-Journey-O", language="en-GB",
        greeting="Hi, Acme here.", interruption_mode="any", interruption_sensitivity="high"),
        agent_id=MANAGED_AGENT)
    await assign_number(db, ORG, CASCADING_NUMBER, CASCADING_AGENT)
    await assign_number(db, ORG, MANAGED_NUMBER, MANAGED_AGENT)


@dataclass
class FakeTwilioRest:
    """A stand-in for Twilio's Calls fetch and update endpoints that records what the SDK sent.

    Every call it is asked about is live (``in-progress``) until it is hung up: through the API
    (``Status=completed``) or by the caller (:meth:`caller_hangs_up`).
    """

    updates: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)
    recordings: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    ended: dict[str, tuple[str, int]] = field(default_factory=dict)  # sid → (status, duration)
    fail_updates_with: int | None = None  # an HTTP status: Twilio having a bad moment
    hold_updates: asyncio.Event | None = None  # answer an update only once this is set
    unknown: set[str] = field(default_factory=set)  # sids a fetch answers 404 for

    def caller_hangs_up(self, call_sid: str, *, duration_s: int) -> None:
        """The caller hangs up: Twilio has the call ``completed``, ``duration_s`` long."""
        self.ended[call_sid] = ("completed", duration_s)

    def app(self) -> web.Application:
        app = web.Application()

        async def fetch(request: web.Request) -> web.Response:
            self.fetches.append(request.match_info["sid"])
            if request.match_info["sid"] in self.unknown:
                return web.json_response({"code": 20404, "message": "The requested resource "
                                          "was not found", "status": 404}, status=404)
            return web.json_response(self.call_resource(request.match_info["sid"]))

        async def update(request: web.Request) -> web.Response:
            form = await request.post()
            if self.fail_updates_with is not None:
                return web.json_response({"code": 20500, "message": "Internal Server Error",
                                          "status": self.fail_updates_with},
                                         status=self.fail_updates_with)
            sid = request.match_info["sid"]
            self.updates.append((sid, {k: str(v) for k, v in form.items()}))
            remember_connects(str(form.get("Twiml", "")))
            if self.hold_updates is not None:
                await self.hold_updates.wait()
            if form.get("Status") in ("completed", "canceled"):
                self.ended.setdefault(sid, (str(form["Status"]), 0))
            return web.json_response(self.call_resource(sid))

        async def record(request: web.Request) -> web.Response:
            form = await request.post()
            self.recordings.append((request.match_info["sid"], {k: str(v) for k, v in
                                                                form.items()}))
            return web.json_response({"sid": "RE" + "0" * 32, "account_sid": ACCOUNT,
                                      "call_sid": request.match_info["sid"],
                                      "status": "in-progress"}, status=201)

        app.router.add_get("/2010-04-01/Accounts/{account}/Calls/{sid}.json", fetch)
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", update)
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{sid}/Recordings.json",
                            record)
        return app

    def call_resource(self, sid: str) -> dict[str, Any]:
        """The Call resource as Twilio answers a fetch or an update (an inbound call's)."""
        status, duration = self.ended.get(sid, ("in-progress", None))
        now = format_datetime(datetime.now(UTC))  # RFC 2822, "+0000", as Twilio dates are
        base = f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}"
        return {
            "account_sid": ACCOUNT, "annotation": None, "answered_by": None,
            "api_version": "2010-04-01", "caller_name": None, "date_created": now,
            "date_updated": now, "direction": "inbound",
            "duration": None if duration is None else str(duration),
            "end_time": None if duration is None else now, "forwarded_from": None,
            "from": CALLER, "from_formatted": CALLER, "group_sid": None,
            "parent_call_sid": None, "phone_number_sid": "PN" + "0" * 32, "price": None,
            "price_unit": "USD", "queue_time": "0", "sid": sid, "start_time": now,
            "status": status,
            "subresource_uris": {name: f"{base}/{name.title().replace('_', '')}.json"
                                 for name in ("notifications", "recordings", "payments",
                                              "events", "siprec", "streams", "transcriptions",
                                              "user_defined_message_subscriptions",
                                              "user_defined_messages")},
            "to": CASCADING_NUMBER, "to_formatted": CASCADING_NUMBER, "trunk_sid": None,
            "uri": f"{base}.json",
        }


@dataclass
class Gateway:
    client: TestClient
    app: web.Application
    config: GatewayConfig
    metrics: Metrics

    async def post(self, path: str, params: dict[str, str], *, signature: str | None = None,
                   headers: dict[str, str] | None = None):
        all_headers = {"X-Twilio-Signature": signature if signature is not None
                       else sign(PUBLIC + path, params), **(headers or {})}
        response = await self.client.post(path, data=params, headers=all_headers)
        if response.content_type == "application/xml":  # (the body stays readable)
            remember_connects(await response.text())
        return response

    async def ws(self, path: str = "/twilio/stream", *, signature: str | None = None,
                 **options: Any):
        headers = {"X-Twilio-Signature": signature if signature is not None
                   else sign(PUBLIC_WS + path)}
        return await self.client.ws_connect(path, headers=headers, **options)

    async def inbound_call(self, number: str = CASCADING_NUMBER, call_sid: str | None = None,
                           ) -> tuple[str, str, ElementTree.Element]:
        """POST /twilio/voice; returns (call_sid, call_id, parsed TwiML)."""
        call_sid = call_sid or new_call_sid()
        response = await self.post("/twilio/voice", {
            "CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": number,
            "Direction": "inbound", "CallStatus": "ringing"})
        assert response.status == 200, await response.text()
        root = ElementTree.fromstring(await response.text())
        params = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
        return call_sid, params.get("call_id", ""), root

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"parley_{name}", labels) or 0.0


@pytest.fixture
async def make_gateway(bus, database_url, configured):
    opened: list[Any] = []

    async def make(*, rest: bool = False, clock=None, shutdown_timeout: float = 60.0,
                   **overrides: Any) -> Gateway:
        twilio_rest = None
        if rest:
            fake = FakeTwilioRest()
            rest_client = TestClient(TestServer(fake.app()))
            await rest_client.start_server()
            opened.append(rest_client)
            twilio_rest = TwilioCalls.create(ACCOUNT, TOKEN,
                                             base_url=str(rest_client.make_url("")))
            opened.append(twilio_rest)
        settings = {"nats_url": "", "database_url": database_url, "public_base_url": PUBLIC,
                    "twilio_auth_token": TOKEN, "instance_id": "gw-test", **overrides}
        config = GatewayConfig(**settings)
        metrics = Metrics("gateway")
        options = {"clock": clock} if clock else {}
        app = create_app(config, bus=bus, metrics=metrics, twilio_rest=twilio_rest, **options)
        server = TestServer(app)
        # the seconds the server gives requests in flight when it stops (__main__: 10)
        await server.start_server(shutdown_timeout=shutdown_timeout)
        client = TestClient(server)
        await client.start_server()
        opened.append(client)
        gateway = Gateway(client=client, app=app, config=config, metrics=metrics)
        if rest:
            gateway.rest_fake = fake  # type: ignore[attr-defined]
        return gateway

    yield make
    for item in reversed(opened):
        await item.close()


@pytest.fixture
async def gateway(make_gateway) -> Gateway:
    return await make_gateway()


class StreamClient:
    """Plays Twilio on a Media Streams socket: numbers messages the way Twilio does."""

    def __init__(self, ws, *, stream_sid: str | None = None) -> None:
        self.ws = ws
        self.stream_sid = stream_sid or f"MZ{next(_sids):032x}"
        self.seq = 0
        self.chunk = 0

    def _next(self) -> str:
        self.seq += 1
        return str(self.seq)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(msgspec.json.encode(message).decode())

    async def connected(self) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    async def start(self, call_sid: str, call_id: str, org_id: str = ORG,
                    agent_id: str = CASCADING_AGENT, token: str | None = None) -> None:
        """``start``, with the stream token of the call's latest <Connect> unless ``token``."""
        await self.send({"event": "start", "sequenceNumber": self._next(), "start": {
            "accountSid": ACCOUNT, "streamSid": self.stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": {
                "call_id": call_id, "org_id": org_id, "agent_id": agent_id,
                "stream_token": stream_token(call_id) if token is None else token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
            "streamSid": self.stream_sid})

    async def media(self, audio: bytes) -> int:
        self.chunk += 1
        seq = self._next()
        await self.send({"event": "media", "sequenceNumber": seq, "media": {
            "track": "inbound", "chunk": str(self.chunk), "timestamp": str(self.chunk * 20),
            "payload": base64.b64encode(audio).decode()}, "streamSid": self.stream_sid})
        return int(seq)

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "sequenceNumber": self._next(),
                         "streamSid": self.stream_sid, "mark": {"name": name}})

    async def dtmf(self, digit: str) -> None:
        await self.send({"event": "dtmf", "sequenceNumber": self._next(),
                         "streamSid": self.stream_sid,
                         "dtmf": {"track": "inbound_track", "digit": digit}})

    async def stop(self, call_sid: str) -> None:
        await self.send({"event": "stop", "sequenceNumber": self._next(),
                         "streamSid": self.stream_sid,
                         "stop": {"accountSid": ACCOUNT, "callSid": call_sid}})

    async def receive_json(self, timeout: float = 5.0) -> dict[str, Any]:
        return msgspec.json.decode((await self.ws.receive(timeout=timeout)).data)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Read (skipping other messages) until the server closes; (code, reason)."""
        return await closed(self.ws, timeout)


async def closed(ws, timeout: float = 5.0) -> tuple[int | None, str]:
    """Read (skipping other messages) until the server closes; (code, reason)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                return ws.close_code, ""


async def started_stream(gateway: Gateway, events: Events, number: str = CASCADING_NUMBER,
                         ) -> tuple[StreamClient, str, str]:
    """An inbound call with a started media stream: (client, call_sid, call_id)."""
    call_sid, call_id, _ = await gateway.inbound_call(number)
    stream = StreamClient(await gateway.ws())
    await stream.connected()
    await stream.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id)
    return stream, call_sid, call_id


def live_calls(gateway: Gateway) -> dict[str, Any]:
    return gateway.app[CALLS].calls
