"""Helpers for the Plivo tests: V3 signing with the plivo SDK's own helpers, a minimal stand-in
for Plivo's Call REST API, a Plivo-flavoured gateway client and a stream client that numbers
messages the way Plivo does. No tests here."""

import base64
import itertools
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from plivo.utils.signature_v3 import construct_get_url, construct_post_url, get_signature_v3

from parley.common.configuration import assign_number

from .conftest import CASCADING_AGENT, ORG, PUBLIC, Gateway, closed

PLIVO_AUTH_ID = "MAZDU1ZTFKMDK3NDEWNJ"
PLIVO_TOKEN = "plivo-test-token-0123456789abcdef"
PLIVO_NUMBER = "+14155550142"
PLIVO_CALLER = "+14155559998"
_nonces = itertools.count(1)


def plivo_signature(method: str, url: str, params: dict[str, str] | None = None, *,
                    nonce: str, token: str = PLIVO_TOKEN) -> str:
    """X-Plivo-Signature-V3 as Plivo computes it (the SDK's own construction)."""
    base = (construct_post_url(url, dict(params or {})) if method == "POST"
            else construct_get_url(url, dict(params or {})))
    return get_signature_v3(token, base.decode(), nonce).decode()


def signed_headers(method: str, url: str, params: dict[str, str] | None = None,
                   ) -> dict[str, str]:
    nonce = f"{next(_nonces):020d}"
    return {"X-Plivo-Signature-V3": plivo_signature(method, url, params, nonce=nonce),
            "X-Plivo-Signature-V3-Nonce": nonce}


def new_call_uuid() -> str:
    return str(uuid.uuid4())


@dataclass
class FakePlivoApi:
    """Plivo's Call REST endpoints, as far as the gateway uses them; records every request."""

    created: list[dict[str, Any]] = field(default_factory=list)
    hung_up: list[str] = field(default_factory=list)
    transferred: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    digits: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    fail_with: tuple[int, dict[str, Any]] | None = None
    fail_transfers_with: int | None = None  # an HTTP status for the Call update endpoint
    drop: bool = False  # a create request's connection is closed once read: no answer
    live: dict[str, str] = field(default_factory=dict)  # CallUUID → call_status (in-progress)
    ended: dict[str, int] = field(default_factory=dict)  # CallUUID → call_duration (its record)
    # CallUUID → (hangup_cause_code, hangup_cause_name, hangup_source) of a call that ended
    # never answered: its record has no answer_time and no duration
    unanswered: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # RequestUUIDs of outbound calls Plivo holds in its queue, not dialled yet (its calls per
    # second spent). Only "Retrieve a queued call" (?status=queued) knows them by that id; once
    # dequeued the call is live, then recorded, under a CallUUID of its own that only its
    # callbacks tell (the live and record lookups never knew the RequestUUID)
    queued: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        base = "/v1/Account/{account}/Call/"

        async def create(request: web.Request) -> web.Response:
            self.auth.append(request.headers.get("Authorization", ""))
            body = await request.json()
            self.created.append(body)
            if self.drop and request.transport is not None:
                request.transport.close()
            if self.fail_with is not None:
                return web.json_response(self.fail_with[1], status=self.fail_with[0])
            return web.json_response({"api_id": str(uuid.uuid4()), "message": "call fired",
                                      "request_uuid": f"req-{len(self.created)}"}, status=201)

        async def hangup(request: web.Request) -> web.Response:
            self.hung_up.append(request.match_info["uuid"])
            return web.Response(status=204)

        async def update(request: web.Request) -> web.Response:
            if self.fail_transfers_with is not None:
                return web.json_response({"api_id": "x", "error": "internal server error"},
                                         status=self.fail_transfers_with)
            self.transferred.append((request.match_info["uuid"], await request.json()))
            return web.json_response({"api_id": "x", "message": "call transferred"},
                                     status=202)

        async def get(request: web.Request) -> web.Response:
            """Retrieve a live call (``?status=live``), a queued one (``?status=queued``, by
            its RequestUUID) or an ended one's record, or 404."""
            call_uuid = request.match_info["uuid"]
            if request.query.get("status") == "queued" and call_uuid in self.queued:
                # Plivo's queued call: its call_uuid is the RequestUUID while it waits
                return web.json_response({
                    "api_id": str(uuid.uuid4()), "call_status": "queued",
                    "call_uuid": call_uuid, "caller_name": PLIVO_NUMBER,
                    "direction": "outbound", "from": PLIVO_NUMBER.lstrip("+"),
                    "request_uuid": call_uuid, "to": PLIVO_CALLER.lstrip("+")})
            if request.query.get("status") == "live" and call_uuid in self.live:
                return web.json_response({
                    "api_id": str(uuid.uuid4()), "call_status": self.live[call_uuid],
                    "call_uuid": call_uuid, "caller_name": "", "direction": "inbound",
                    "from": PLIVO_CALLER, "request_uuid": call_uuid,
                    "session_start": "2026-12-07 18:00:00.000000", "to": PLIVO_NUMBER})
            if "status" not in request.query and call_uuid in self.ended:
                return web.json_response({
                    "answer_time": "2026-12-07 18:00:00+00:00", "api_id": str(uuid.uuid4()),
                    "bill_duration": self.ended[call_uuid], "billed_duration": 60,
                    "call_direction": "inbound", "call_duration": self.ended[call_uuid],
                    "call_uuid": call_uuid, "end_time": "2026-12-07 18:01:00+00:00",
                    "from_number": PLIVO_CALLER, "initiation_time": "2026-12-07 18:00:00+00:00",
                    "parent_call_uuid": None, "resource_uri": request.path,
                    "to_number": PLIVO_NUMBER, "total_amount": "0.00500",
                    "total_rate": "0.00500", "hangup_cause_name": "Normal Hangup",
                    "hangup_cause_code": 4000, "hangup_source": "Caller"})
            if "status" not in request.query and call_uuid in self.unanswered:
                # a call never answered, as Plivo's Call object has it: answer_time null, no
                # duration, why it ended in hangup_cause_*
                code, name, source = self.unanswered[call_uuid]
                return web.json_response({
                    "answer_time": None, "api_id": str(uuid.uuid4()), "bill_duration": 0,
                    "billed_duration": 0, "call_direction": "outbound", "call_duration": 0,
                    "call_uuid": call_uuid, "end_time": "2026-12-07 18:00:30+00:00",
                    "from_number": PLIVO_NUMBER, "initiation_time": "2026-12-07 18:00:00+00:00",
                    "parent_call_uuid": None, "resource_uri": request.path,
                    "to_number": PLIVO_CALLER, "total_amount": "0.00000",
                    "total_rate": "0.00500", "hangup_cause_name": name,
                    "hangup_cause_code": code, "hangup_source": source})
            return web.json_response({"api_id": str(uuid.uuid4()), "error": "not found"},
                                     status=404)

        async def dtmf(request: web.Request) -> web.Response:
            self.digits.append((request.match_info["uuid"], await request.json()))
            return web.json_response({"api_id": "x", "message": "digits sent"}, status=202)

        app.router.add_post(base, create)
        app.router.add_get(base + "{uuid}/", get)
        app.router.add_delete(base + "{uuid}/", hangup)
        app.router.add_post(base + "{uuid}/", update)
        app.router.add_post(base + "{uuid}/DTMF/", dtmf)
        return app


@dataclass
class PlivoGateway:
    """The gateway under test, spoken to as Plivo would."""

    gateway: Gateway
    api: FakePlivoApi

    @property
    def app(self) -> web.Application:
        return self.gateway.app

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metric(name, **labels)

    async def post(self, path: str, params: dict[str, str], *,
                   headers: dict[str, str] | None = None):
        all_headers = headers if headers is not None else signed_headers(
            "POST", PUBLIC + path, params)
        all_headers = {**all_headers, "Content-Type": "application/x-www-form-urlencoded"}
        return await self.gateway.client.post(path, data=urlencode(params), headers=all_headers)

    async def answer(self, *, number: str = PLIVO_NUMBER, call_uuid: str | None = None,
                     path: str = "/plivo/answer", **extra: str,
                     ) -> tuple[str, str, ElementTree.Element]:
        """POST the answer URL; returns (CallUUID, our call id, parsed XML)."""
        call_uuid = call_uuid or new_call_uuid()
        response = await self.post(path, {
            "CallUUID": call_uuid, "From": PLIVO_CALLER, "To": number, "Direction": "inbound",
            "CallStatus": "in-progress", "Event": "StartApp", **extra})
        assert response.status == 200, await response.text()
        assert response.content_type == "application/xml"
        root = ElementTree.fromstring(await response.text())
        stream = root.find("Stream")
        call_id = "" if stream is None else stream.text.rsplit("call_id=", 1)[1]
        return call_uuid, call_id, root

    async def ws(self, call_id: str, *, headers: dict[str, str] | None = None,
                 **options: Any):
        path = f"/plivo/stream?call_id={call_id}"
        all_headers = headers if headers is not None else signed_headers("GET", PUBLIC + path)
        return await self.gateway.client.ws_connect(path, headers=all_headers, **options)


class PlivoStreamClient:
    """Plays Plivo on an audio-stream socket: numbers every message, as Plivo does."""

    def __init__(self, ws, *, stream_id: str | None = None) -> None:
        self.ws = ws
        self.stream_id = stream_id or str(uuid.uuid4())
        self.seq = 0
        self.chunk = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(msgspec.json.encode(message).decode())

    async def start(self, call_uuid: str, *, encoding: str = "audio/x-mulaw",
                    sample_rate: int = 8000) -> None:
        await self.send({"event": "start", "sequenceNumber": self._next(), "start": {
            "callId": call_uuid, "streamId": self.stream_id, "accountId": PLIVO_AUTH_ID,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": encoding, "sampleRate": sample_rate}},
            "extra_headers": ""})

    async def media(self, audio: bytes, *, payload: str | None = None) -> int:
        self.chunk += 1
        seq = self._next()
        await self.send({"event": "media", "sequenceNumber": seq, "streamId": self.stream_id,
                         "media": {"track": "inbound", "timestamp": str(1705312200000
                                                                        + self.chunk * 20),
                                   "chunk": self.chunk,
                                   "payload": payload or base64.b64encode(audio).decode()},
                         "extra_headers": ""})
        return seq

    async def dtmf(self, digit: str) -> None:
        await self.send({"event": "dtmf", "sequenceNumber": self._next(),
                         "streamId": self.stream_id,
                         "dtmf": {"track": "inbound", "digit": digit,
                                  "timestamp": "1705312200000"}})

    async def played(self, name: str) -> None:
        await self.send({"event": "playedStream", "sequenceNumber": self._next(),
                         "streamId": self.stream_id, "name": name})

    async def cleared(self) -> None:
        await self.send({"event": "clearedAudio", "sequenceNumber": self._next(),
                         "streamId": self.stream_id})

    async def receive_json(self, timeout: float = 5.0) -> dict[str, Any]:
        return msgspec.json.decode((await self.ws.receive(timeout=timeout)).data)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        return await closed(self.ws, timeout)


def https_form(ws_url: str) -> str:
    """The URL a ``wss://`` stream URL is signed over: same host, path and query."""
    parts = urlsplit(ws_url)
    return f"https://{parts.netloc}{parts.path}?{parts.query}"


@pytest.fixture
async def plivo_number(db, configured) -> str:
    await assign_number(db, ORG, PLIVO_NUMBER, CASCADING_AGENT, carrier="plivo")
    return PLIVO_NUMBER


@pytest.fixture
async def make_plivo_gateway(make_gateway, plivo_number):
    servers: list[TestClient] = []

    async def make(**overrides: Any) -> PlivoGateway:
        api = FakePlivoApi()
        server = TestClient(TestServer(api.app()))
        await server.start_server()
        servers.append(server)
        settings = {"plivo_auth_id": PLIVO_AUTH_ID, "plivo_auth_token": PLIVO_TOKEN,
                    "plivo_api_base_url": str(server.make_url("")).rstrip("/"), **overrides}
        return PlivoGateway(gateway=await make_gateway(**settings), api=api)

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def plivo_gateway(make_plivo_gateway) -> PlivoGateway:
    return await make_plivo_gateway()


async def started_plivo_stream(gateway: PlivoGateway, events,
                               ) -> tuple[PlivoStreamClient, str, str]:
    """An inbound Plivo call with a started stream: (client, CallUUID, call id)."""
    call_uuid, call_id, _ = await gateway.answer()
    stream = PlivoStreamClient(await gateway.ws(call_id))
    await stream.start(call_uuid)
    await events.wait("call.stream_started", call_id)
    return stream, call_uuid, call_id
