"""A carrier socket that dies without closing is closed, and its call ends unless it comes back.

Short timeouts here; the defaults (ping after 10 s, silence 30 s, 15 s to reconnect) are in
GatewayConfig. A live client answers pings only while it reads, as aiohttp's does.
"""

import asyncio
import contextlib
import xml.etree.ElementTree as ElementTree

import uvloop
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from parley.gateway.twilio.liveness import Liveness

from .conftest import (
    MANAGED_AGENT,
    MANAGED_NUMBER,
    ORG,
    StreamClient,
    closed,
    live_calls,
    reconnect_path,
    started_stream,
    stream_token,
    wait_for,
)
from .test_plivo_support import make_plivo_gateway, plivo_number, started_plivo_stream
from .test_relay import send, setup_relay

__all__ = ["make_plivo_gateway", "plivo_number"]  # the Plivo fixtures, visible to pytest here

SILENT = {"gateway_carrier_silence_s": 0.5, "gateway_carrier_ping_s": 0,
          "gateway_carrier_reconnect_wait_s": 0.3}
NO_PONG = {"gateway_carrier_silence_s": 0, "gateway_carrier_ping_s": 0.4,
           "gateway_carrier_reconnect_wait_s": 0.3}


async def elapsed(awaitable):
    """(result, seconds it took)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await awaitable
    return result, loop.time() - began


async def test_a_media_stream_gone_silent_is_closed_and_hung_up_at_twilio(make_gateway, events):
    gateway = await make_gateway(rest=True, **SILENT)
    stream, call_sid, call_id = await started_stream(gateway, events)
    for _ in range(3):
        await stream.media(b"\xff" * 160)
    # ... then nothing: a partition. The socket is closed within the silence limit,
    (code, reason), took = await elapsed(stream.closed(timeout=5))
    assert code == 4410 and reason.startswith("carrier socket silent for 0.")
    assert took < 0.5 + 0.5
    assert gateway.metric("gateway_socket_closes_total", protocol="twilio_stream",
                          code="4410") == 1
    # and, Twilio not having come back through the reconnect URL, the call ends, at Twilio too
    # (the caller may still be on the line there).
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"
    await wait_for(lambda: gateway.rest_fake.updates)
    assert gateway.rest_fake.updates == [(call_sid, {"Status": "completed"})]
    await wait_for(lambda: call_id not in live_calls(gateway))


async def test_a_media_stream_without_pongs_is_closed_and_its_call_ended(make_gateway, events):
    gateway = await make_gateway(**NO_PONG)
    call_sid, call_id, _ = await gateway.inbound_call()
    stream = StreamClient(await gateway.ws(autoping=False))  # a peer that answers nothing
    await stream.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id)
    (code, reason), took = await elapsed(stream.closed(timeout=5))
    assert code == 4409 and reason.startswith("no pong within 0.2 s")
    assert took < 0.4 + 0.2 + 0.5
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"


async def test_a_dead_socket_whose_call_twilio_reconnects_goes_on(make_gateway, events):
    gateway = await make_gateway(**{**SILENT, "gateway_carrier_reconnect_wait_s": 1.0})
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert (await stream.closed(timeout=5))[0] == 4410
    # Twilio, whose end saw the socket go, asks the <Connect action> URL and streams again
    response = await gateway.post(reconnect_path(call_id),
                                  {"CallSid": call_sid})
    assert ElementTree.fromstring(await response.text()).find("Connect") is not None
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    for _ in range(10):  # past the reconnect wait, streaming as Twilio does
        await newer.media(b"\xff" * 160)
        await asyncio.sleep(0.1)
    assert events.of("call.ended", call_id) == []
    assert call_id in live_calls(gateway)
    await newer.stop(call_sid)
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_reconnect_wait_of_zero_hangs_up_at_once(make_gateway, events):
    """PARLEY_GATEWAY_CARRIER_RECONNECT_WAIT_S=0 is no wait, not a check turned off (README had
    said "0: check off" for all three dead-socket settings; it is so only for the ping and the
    silence): the call of a socket taken for dead is hung up at once, at Twilio too, and a
    reconnect Twilio asks for after that is answered <Hangup/>."""
    gateway = await make_gateway(rest=True, gateway_carrier_silence_s=0.5,
                                 gateway_carrier_ping_s=0, gateway_carrier_reconnect_wait_s=0)
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert (await stream.closed(timeout=5))[0] == 4410
    [ended], took = await elapsed(events.wait("call.ended", call_id, timeout=5))
    assert ended.reason == "error" and took < 0.5
    await wait_for(lambda: gateway.rest_fake.updates)
    assert gateway.rest_fake.updates == [(call_sid, {"Status": "completed"})]
    response = await gateway.post(reconnect_path(call_id),
                                  {"CallSid": call_sid})
    assert ElementTree.fromstring(await response.text()).find("Hangup") is not None


async def test_a_call_waiting_for_its_carrier_is_hung_up_when_the_gateway_stops(make_gateway,
                                                                                events):
    """A socket taken for dead waits gateway_carrier_reconnect_wait_s for the carrier to come
    back, then hangs the call up. The wait was its request handler's: when the gateway stopped
    during it, the server's shutdown cancelled the handler (or, the connection being gone,
    never waited for it) and closed the pool and clients, and the call was never hung up: live
    at the carrier, billed, until the carrier ended it. A stopping gateway now waits no
    longer: it checks whether the carrier came back and, as it has not, hangs up before it
    closes what that needs."""
    gateway = await make_gateway(rest=True, shutdown_timeout=0.5,  # (__main__: 10)
                                 **{**SILENT, "gateway_carrier_reconnect_wait_s": 60})
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert (await stream.closed(timeout=5))[0] == 4410
    await asyncio.sleep(0.3)  # waiting for Twilio to come back through the reconnect URL
    assert events.of("call.ended", call_id) == []

    _, took = await elapsed(asyncio.wait_for(gateway.client.close(), 10))  # the gateway stops
    assert took < 5
    [ended] = events.of("call.ended", call_id) or await events.wait("call.ended", call_id)
    assert ended.reason == "error"
    assert gateway.rest_fake.updates == [(call_sid, {"Status": "completed"})]


async def test_a_call_whose_carrier_came_back_is_not_hung_up_when_the_gateway_stops(
        make_gateway, events):
    """The same stop, once Twilio has asked the reconnect URL: the call is another socket's
    (here, or on the instance Twilio reconnects to), and the stopping gateway leaves it be."""
    gateway = await make_gateway(rest=True, **{**SILENT, "gateway_carrier_reconnect_wait_s": 60})
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert (await stream.closed(timeout=5))[0] == 4410
    response = await gateway.post(reconnect_path(call_id),
                                  {"CallSid": call_sid})
    assert ElementTree.fromstring(await response.text()).find("Connect") is not None

    await asyncio.wait_for(gateway.client.close(), 10)
    await asyncio.sleep(0.2)
    assert events.of("call.ended", call_id) == []
    assert gateway.rest_fake.updates == []


async def test_a_streaming_socket_that_answers_pings_is_kept(make_gateway, events):
    """A media stream whose audio pauses for longer than the ping interval (but less than the
    silence limit) is pinged in each pause, answers, and is kept: the pong is what proves it
    alive. (This test used to stream every 0.1 s with pings due after 0.3 s of quiet, so no
    ping was ever sent.)"""
    gateway = await make_gateway(gateway_carrier_silence_s=1.0, gateway_carrier_ping_s=0.3,
                                 gateway_carrier_reconnect_wait_s=0.3)
    call_sid, call_id, _ = await gateway.inbound_call()
    stream = StreamClient(await gateway.ws(autoping=False))  # pongs counted, sent by hand
    await stream.connected()
    await stream.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id)
    pings: list[bytes] = []

    async def answer_pings() -> tuple[int | None, str]:
        while True:
            msg = await stream.ws.receive()
            if msg.type is WSMsgType.PING:
                pings.append(msg.data)
                await stream.ws.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            elif msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                return stream.ws.close_code, ""

    reader = asyncio.create_task(answer_pings())
    try:
        for _ in range(4):  # 2.4 s in all: bursts of audio, then a pause longer than ping_s
            for _ in range(5):
                await stream.media(b"\xff" * 160)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
        assert len(pings) >= 3  # one a pause, each answered
        assert not reader.done() and call_id in live_calls(gateway)
        await stream.stop(call_sid)
        assert await asyncio.wait_for(reader, 5) == (1000, "stream stopped")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_quiet_relay_that_answers_pings_is_kept(make_gateway, events):
    # ConversationRelay says nothing between utterances; the silence check is not for it
    gateway = await make_gateway(gateway_carrier_silence_s=0.3, gateway_carrier_ping_s=0.3,
                                 gateway_carrier_reconnect_wait_s=0.3)
    ws, _, call_id = await setup_relay(gateway, events)
    reader = asyncio.create_task(closed(ws, timeout=10))
    try:
        await asyncio.sleep(2.0)
        assert not reader.done() and call_id in live_calls(gateway)
        assert events.of("call.ended", call_id) == []
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()


async def test_a_relay_without_pongs_is_closed_and_its_call_ended(make_gateway, events):
    gateway = await make_gateway(**NO_PONG)
    call_sid, call_id, _ = await gateway.inbound_call(MANAGED_NUMBER)
    ws = await gateway.ws("/twilio/relay", autoping=False)
    await send(ws, {"type": "setup", "sessionId": "VX" + "2" * 32, "callSid": call_sid,
                    "customParameters": {"call_id": call_id, "org_id": ORG,
                                         "agent_id": MANAGED_AGENT,
                                         "stream_token": stream_token(call_id)}})
    await events.wait("call.stream_started", call_id)
    code, reason = await closed(ws, timeout=5)
    assert code == 4409 and reason.startswith("no pong within 0.2 s")
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"
    assert gateway.metric("gateway_socket_closes_total", protocol="twilio_relay",
                          code="4409") == 1


async def test_a_plivo_stream_gone_silent_is_closed_and_hung_up_at_plivo(make_plivo_gateway,
                                                                         events):
    plivo = await make_plivo_gateway(**SILENT)
    stream, call_uuid, call_id = await started_plivo_stream(plivo, events)
    await stream.media(b"\xff" * 160)
    code, reason = await stream.closed(timeout=5)
    assert code == 4410 and reason.startswith("carrier socket silent for 0.")
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"
    await wait_for(lambda: plivo.api.hung_up == [call_uuid])


def test_a_pong_within_its_pings_millisecond_counts_on_uvloop():
    """Services run on uvloop, whose loop.time() counts milliseconds and stands still within a
    loop iteration. A pong that came back within its ping's millisecond (a peer on the same host:
    Twilio played by the e2e tests, a local ConversationRelay client) was stamped with the
    ping's time, taken for no pong, and a live socket closed 4409 after its first quiet
    ping_s (a managed call whose caller said nothing for 10 s). Frames are now counted."""
    verdicts = []

    async def carrier_socket(request):
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        liveness = Liveness(ws, ping_s=0.05, silence_s=0)
        watch = asyncio.create_task(liveness.watch())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # twenty pings and more
                async for msg in ws:  # as TwilioSession.run reads
                    liveness.heard(said=msg.type is WSMsgType.TEXT)
        verdicts.append(watch.result() if watch.done() else "alive")
        watch.cancel()
        await ws.close()
        return ws

    async def scenario():
        app = web.Application()
        app.router.add_get("/ws", carrier_socket)
        async with TestClient(TestServer(app)) as client:
            ws = await client.ws_connect("/ws")  # answers pings while it reads
            await ws.receive()
            await ws.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
    assert verdicts == ["alive"]
