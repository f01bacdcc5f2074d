"""Hypothesis throws random JSON, text and bytes at both sockets and random forms at the webhooks.

Properties: no 5xx and no 1011 (every bad input gets a precise 4xx or close code), the server
stays up, and a good call running alongside keeps working. The gateway runs on its own event
loop in a thread so hypothesis can drive it from plain (synchronous) test functions.
"""

import asyncio
import base64
import json
import threading
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import msgspec
import psycopg
import pytest

from parley.common.bus import Bus
from parley.common.bus.audio import decode_frame
from parley.common.configuration import AgentSettings, assign_number, create_agent, create_org
from parley.common.metrics import Metrics
from parley.gateway.app import create_app
from parley.gateway.config import GatewayConfig

from .conftest import (
    ACCOUNT,
    CALLER,
    PUBLIC,
    PUBLIC_WS,
    TOKEN,
    new_call_sid,
    remember_connects,
    sign,
    stream_token,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ORG, AGENT, NUMBER = "org_fuzz", "ag_fuzz", "+14155550142"
MANAGED_AGENT, MANAGED_NUMBER = "ag_fuzz_managed", "+14155550143"
FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class ServerThread:
    """The gateway on a private event loop in a thread; examples talk to it over TCP."""

    def __init__(self, nats_url: str, database_url: str) -> None:
        self.nats_url, self.database_url = nats_url, database_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-fuzz")
        self.base = ""

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url,
                                                         autocommit=True) as conn:
            await create_org(conn, ORG, "Fuzz")
            await create_agent(conn, ORG, "Fuzz", AgentSettings(), agent_id=AGENT)
            await create_agent(conn, ORG, "Managed", AgentSettings(pipeline="managed"),
                               agent_id=MANAGED_AGENT)
            await assign_number(conn, ORG, NUMBER, AGENT)
            await assign_number(conn, ORG, MANAGED_NUMBER, MANAGED_AGENT)
        self.bus = await Bus.connect(self.nats_url, name="gateway-fuzz")
        await self.bus.ensure_streams()
        config = GatewayConfig(database_url=self.database_url, public_base_url=PUBLIC,
                               twilio_auth_token=TOKEN, stream_start_timeout_s=1.0)
        self.metrics = Metrics("gateway")
        self.runner = aiohttp.web.AppRunner(create_app(config, bus=self.bus,
                                                       metrics=self.metrics))
        await self.runner.setup()
        site = aiohttp.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.bus.close()


@pytest.fixture
def server(nats_url, database_url):
    running = ServerThread(nats_url, database_url)
    running.start()
    yield running
    running.stop()


# -- clients (each example runs on its own short-lived loop in the test's thread) ------------

async def post(session: aiohttp.ClientSession, base: str, path: str, form: dict[str, str],
               *, signed: bool = True) -> aiohttp.ClientResponse:
    signature = sign(PUBLIC + path, form) if signed else "x"
    headers = {"X-Twilio-Signature": signature,
               "Content-Type": "application/x-www-form-urlencoded"}
    async with session.post(base + path, data=urlencode(form), headers=headers) as response:
        await response.read()
        return response


async def new_call(session, base: str, number: str = NUMBER) -> tuple[str, str]:
    call_sid = new_call_sid()
    response = await session.post(base + "/twilio/voice", data=form_of(call_sid, number),
                                  headers={"X-Twilio-Signature": sign(
                                      PUBLIC + "/twilio/voice", form_of(call_sid, number))})
    text = await response.text()
    remember_connects(text)  # its stream token, for the start
    return call_sid, text.split('name="call_id" value="')[1].split('"')[0]


def form_of(call_sid: str, number: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": number}


async def socket(session, base: str, path: str):
    return await session.ws_connect(base + path,
                                    headers={"X-Twilio-Signature": sign(PUBLIC_WS + path)})


async def drain(ws, timeout: float = 0.5) -> int | None:
    """Read until the server closes (its code) or goes quiet (None: still open)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    return int(msg.data)
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return ws.close_code
    except TimeoutError:
        return None


# -- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
payloads = st.binary(max_size=320).map(lambda b: base64.b64encode(b).decode())
stream_messages = st.one_of(
    st.fixed_dictionaries({"event": st.sampled_from(
        ["connected", "start", "media", "mark", "dtmf", "stop", "nope"])}, optional={
        "sequenceNumber": st.one_of(st.integers(-2, 1000).map(str), st.integers(), json_values),
        "streamSid": st.sampled_from(["$SID", "MZother"]) | st.text(max_size=6),
        "media": st.fixed_dictionaries({"payload": payloads | st.text(max_size=20)}, optional={
            "track": st.sampled_from(["inbound", "outbound"]), "timestamp": json_values,
            "chunk": json_values}) | json_values,
        "start": st.fixed_dictionaries({"streamSid": st.just("$SID"), "callSid": st.text(
            max_size=6), "customParameters": st.dictionaries(st.sampled_from(
                ["call_id", "org_id", "agent_id"]), st.text(max_size=40))}) | json_values,
        "mark": st.fixed_dictionaries({"name": st.text(max_size=20)}) | json_values,
        "dtmf": st.fixed_dictionaries({"digit": st.text(max_size=3)}) | json_values,
    }).map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100),
)
relay_messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(
        ["setup", "prompt", "interrupt", "dtmf", "info", "error", "nope"])}, optional={
        "voicePrompt": json_values, "last": json_values, "digit": json_values,
        "utteranceUntilInterrupt": json_values, "durationUntilInterruptMs": json_values,
        "description": json_values, "callSid": json_values, "customParameters": json_values,
        "name": st.sampled_from(["agentSpeaking", "tokensPlayed", "x"]) | json_values,
        "value": json_values,
    }).map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100),
)
FIELDS = ["CallSid", "To", "From", "CallStatus", "CallDuration", "Direction", "AnsweredBy",
          "RecordingSid", "RecordingUrl", "RecordingDuration", "RecordingStatus", "HandoffData"]
forms = st.dictionaries(st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8),
                        st.sampled_from(["$CALLSID", NUMBER, "completed", "ringing",
                                         "machine_start", "outbound-api", "CA\x00", "RE\x00",
                                         "$CALLSID\x00", "-1", "1e400", "nan"])
                        | st.text(max_size=30),
                        max_size=8)
paths = st.sampled_from(["/twilio/voice", "/twilio/status", "/twilio/amd", "/twilio/recording",
                         "/twilio/voice/reconnect"]).flatmap(
    lambda path: (st.sampled_from(["", "?call_id=$CALLID", "?call_id=call_x&org_id=org_fuzz"
                                   "&agent_id=ag_fuzz", "?call_id=%00", "?org_id=%00"])
                  | st.text(max_size=12).map(lambda q: "?call_id=" + quote(q, safe=""))
                  ).map(lambda query: path + query))

ALLOWED_CLOSES = {None, 1000, 1003, 1008, 1009, 4400, 4402, 4403, 4404, 4405, 4408}


# -- the properties --------------------------------------------------------------------------

@FUZZ
@given(messages=st.lists(stream_messages, min_size=1, max_size=6), with_start=st.booleans())
def test_fuzz_media_stream(server, messages, with_start):
    async def example() -> int | None:
        async with aiohttp.ClientSession() as session:
            ws = await socket(session, server.base, "/twilio/stream")
            sid = "MZ" + "a" * 32
            if with_start:
                call_sid, call_id = await new_call(session, server.base)
                await ws.send_str(msgspec.json.encode({
                    "event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
                        "streamSid": sid, "callSid": call_sid, "customParameters": {
                            "call_id": call_id, "org_id": ORG, "agent_id": AGENT,
                            "stream_token": stream_token(call_id)}}}).decode())
            for message in messages:
                if ws.closed:
                    break
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message.replace("$SID", sid))
            code = await drain(ws, 0.3)
            await ws.close()
            return code

    assert asyncio.run(example()) in ALLOWED_CLOSES


@FUZZ
@given(messages=st.lists(relay_messages, min_size=1, max_size=6), with_setup=st.booleans())
def test_fuzz_conversation_relay(server, messages, with_setup):
    async def example() -> int | None:
        async with aiohttp.ClientSession() as session:
            ws = await socket(session, server.base, "/twilio/relay")
            if with_setup:
                call_sid, call_id = await new_call(session, server.base, MANAGED_NUMBER)
                await ws.send_str(msgspec.json.encode({
                    "type": "setup", "callSid": call_sid, "customParameters": {
                        "call_id": call_id, "org_id": ORG, "agent_id": MANAGED_AGENT,
                        "stream_token": stream_token(call_id)}}).decode())
            for message in messages:
                if ws.closed:
                    break
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
            code = await drain(ws, 0.3)
            await ws.close()
            return code

    assert asyncio.run(example()) in ALLOWED_CLOSES


@FUZZ
@given(path=paths, form=forms, signed=st.booleans())
def test_fuzz_webhooks(server, path, form, signed):
    async def example() -> int:
        async with aiohttp.ClientSession() as session:
            call_sid, call_id = await new_call(session, server.base)
            real_path = path.replace("$CALLID", call_id)
            real_form = {k: v.replace("$CALLSID", call_sid) for k, v in form.items()}
            response = await post(session, server.base, real_path, real_form, signed=signed)
            return response.status

    status = asyncio.run(example())
    assert status < 500
    if not signed:
        assert status == 403


def test_server_survives_the_fuzz_and_a_concurrent_call_works(server):
    """A good call streams while garbage hits other sockets; it still works end to end."""
    received: list[bytes] = []

    async def subscribe(call_id: str):
        async def on_in(msg):
            received.append(decode_frame(msg.data)[3])

        return await server.bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            call_sid, call_id = await new_call(session, server.base)
            subscription = asyncio.run_coroutine_threadsafe(subscribe(call_id), server.loop)
            sub = await asyncio.wrap_future(subscription)
            good = await socket(session, server.base, "/twilio/stream")
            sid = "MZ" + "b" * 32
            await good.send_json({"event": "start", "sequenceNumber": "1", "streamSid": sid,
                                  "start": {"streamSid": sid, "callSid": call_sid,
                                            "customParameters": {
                                                "call_id": call_id,
                                                "stream_token": stream_token(call_id)}}})
            for n in range(2, 42):
                garbage = await socket(session, server.base, "/twilio/stream")
                await garbage.send_str("{" * n)
                await good.send_json({"event": "media", "sequenceNumber": str(n),
                                      "streamSid": sid, "media": {"payload": base64.b64encode(
                                          bytes([n]) * 160).decode(), "timestamp": str(n)}})
                assert await drain(garbage, 2.0) == 1003
                await garbage.close()
            await good.send_json({"event": "stop", "sequenceNumber": "99", "streamSid": sid})
            assert await drain(good, 2.0) == 1000
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(sub.unsubscribe(),
                                                                       server.loop))
            async with session.get(server.base + "/healthz-does-not-exist") as response:
                assert response.status == 404

    asyncio.run(scenario())
    assert received == [bytes([n]) * 160 for n in range(2, 42)]
