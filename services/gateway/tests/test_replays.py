"""Signed requests captured and sent again: refused, whichever instance they reach.

A carrier's signature binds a request's URL and parameters, not when it was sent: Plivo's V3
nonce is remembered across instances (Postgres) so a webhook or upgrade replayed is refused;
a Twilio Media Streams upgrade (signed over a URL without parameters, so the same for every
call) opens a stream only with the one-time token the call's <Connect> carried; and a replayed
<Connect action> of a stream long replaced cannot count as a reconnect nor end the call.
"""

import asyncio
import xml.etree.ElementTree as ElementTree
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import make_mocked_request

from parley.gateway import replays
from parley.gateway.calls import count_milestones

from . import test_plivo_support as support
from .conftest import (
    ACCOUNT,
    CALLER,
    CASCADING_NUMBER,
    MANAGED_AGENT,
    MANAGED_NUMBER,
    ORG,
    PUBLIC,
    StreamClient,
    closed,
    live_calls,
    reconnect_path,
    started_stream,
    stream_token,
)
from .test_media_stream import request
from .test_plivo_support import (
    PLIVO_CALLER,
    PLIVO_NUMBER,
    new_call_uuid,
    signed_headers,
)

make_plivo_gateway = support.make_plivo_gateway
plivo_gateway = support.plivo_gateway
plivo_number = support.plivo_number


def _answer(call_uuid: str) -> dict[str, str]:
    return {"CallUUID": call_uuid, "From": PLIVO_CALLER, "To": PLIVO_NUMBER,
            "Direction": "inbound", "CallStatus": "in-progress", "Event": "StartApp"}


def legacy_reconnect_path(call_id: str) -> str:
    """The <Connect action> of TwiML from before stream tokens: no connect= (nor signature)."""
    return f"/twilio/voice/reconnect?{urlencode({'call_id': call_id})}"


async def reconnects_then_ends(gateway, events, action: str, call_sid: str, call_id: str, *,
                               streams: int) -> None:
    """Twilio asks ``action`` once the stream dropped: it reconnects the call (a <Connect>, the
    new stream the call's ``streams``-th, the call not ended), and that stream's stop ends it."""
    response = await gateway.post(action, {"CallSid": call_sid, "CallStatus": "in-progress"})
    root = ElementTree.fromstring(await response.text())
    assert root.find("./Connect/Stream") is not None, await response.text()
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=streams)
    assert events.of("call.ended", call_id) == []
    await newer.stop(call_sid)
    await events.wait("call.ended", call_id)


async def test_a_replayed_plivo_webhook_is_refused_on_every_instance(make_plivo_gateway,
                                                                      events):
    first, second = await make_plivo_gateway(), await make_plivo_gateway()
    params = _answer(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    response = await first.post("/plivo/answer", params, headers=headers)
    assert response.status == 200, await response.text()
    await events.wait("call.requested")

    for gateway in (first, second):  # the same signed request again, to either instance
        replay = await gateway.post("/plivo/answer", params, headers=headers)
        assert replay.status == 403
        assert replay.content_type == "application/problem+json"
        problem = await replay.json()
        assert problem["status"] == 403 and "Nonce already used" in problem["detail"]
        assert problem["type"].endswith("replayed-request")
        assert gateway.metric("gateway_replays_refused_total", carrier="plivo",
                              path="/plivo/answer", kind="nonce") == 1
    assert len(events.of("call.requested")) == 1
    # a fresh nonce (what Plivo sends with every request, retries included) is let through
    response = await second.post("/plivo/answer", params)
    assert response.status == 200


async def test_a_replayed_plivo_stream_upgrade_is_refused(plivo_gateway, events):
    _, call_id, _ = await plivo_gateway.answer()
    path = f"/plivo/stream?{urlencode({'call_id': call_id})}"
    headers = signed_headers("GET", PUBLIC + path)
    ws = await plivo_gateway.ws(call_id, headers=headers)
    await ws.close()
    response = await plivo_gateway.gateway.client.get(path, headers={
        **headers, "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.status == 403
    assert plivo_gateway.metric("gateway_replays_refused_total", carrier="plivo",
                                path="/plivo/stream", kind="nonce") == 1


# -- Twilio: stream tokens ---------------------------------------------------------------------

async def test_a_replayed_stream_start_cannot_take_a_live_call_on_any_instance(make_gateway,
                                                                            events):
    first, second = await make_gateway(), await make_gateway(instance_id="gw-test-2")
    stream, call_sid, call_id = await started_stream(first, events)
    token = stream_token(call_id)
    # Twilio signs the upgrade over wss://…/twilio/stream alone: the same signature opens a
    # socket for any call, and the start captured with it names the call and its token
    for gateway, replayed_token in ((first, token), (second, token), (second, None)):
        replay = StreamClient(await gateway.ws())  # a stream sid of its own
        await replay.connected()
        await replay.start(call_sid, call_id, token=replayed_token or "")
        code, reason = await replay.closed()
        assert code == 4406
        assert reason == ("stream token already used" if replayed_token else "no stream token")
    assert first.metric("gateway_replays_refused_total", carrier="twilio",
                        path="/twilio/stream", kind="stream_token") == 1
    assert second.metric("gateway_replays_refused_total", carrier="twilio",
                         path="/twilio/stream", kind="stream_token") == 2
    # the call is still the first stream's: nothing replaced it, it still carries the caller
    assert len(events.of("call.stream_started", call_id)) == 1
    assert live_calls(first)[call_id].stream_id == stream.stream_sid
    assert call_id not in live_calls(second)
    await stream.media(b"\xff" * 160)
    await stream.stop(call_sid)
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_token_is_only_good_for_its_call_and_for_its_lifetime(make_gateway, events):
    gateway = await make_gateway(gateway_stream_token_ttl_s=0.3)
    call_sid, call_id, _ = await gateway.inbound_call()
    other_sid, other_id, _ = await gateway.inbound_call()
    stream = StreamClient(await gateway.ws())
    await stream.start(call_sid, call_id, token=stream_token(other_id))
    assert await stream.closed() == (4406, "stream token not issued for this call")
    await asyncio.sleep(0.4)
    late = StreamClient(await gateway.ws())
    await late.start(other_sid, other_id)
    assert await late.closed() == (4406, "stream token expired")
    assert events.of("call.stream_started") == []


async def test_each_new_stream_of_a_call_gets_its_own_token(gateway, events):
    stream, call_sid, call_id = await started_stream(gateway, events)
    first_token = stream_token(call_id)
    await stream.ws.close()  # the socket drops; Twilio asks the <Connect action>
    response = await gateway.post(reconnect_path(call_id), {"CallSid": call_sid,
                                                            "CallStatus": "in-progress"})
    assert ElementTree.fromstring(await response.text()).find("./Connect/Stream") is not None
    assert stream_token(call_id) != first_token
    stale = StreamClient(await gateway.ws())
    await stale.start(call_sid, call_id, token=first_token)
    assert await stale.closed() == (4406, "stream token already used")
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    assert live_calls(gateway)[call_id].stream_id == newer.stream_sid


# -- Twilio: replayed voice and <Connect action> webhooks -------------------------------------

async def test_a_replayed_reconnect_cannot_end_a_live_call(make_gateway, events, db):
    gateway = await make_gateway(max_reconnects=1)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.ws.close()
    # Twilio's reconnect, as captured by whoever can replay it: signed URL and form
    captured_path, form = reconnect_path(call_id), {"CallSid": call_sid,
                                                    "CallStatus": "in-progress"}
    response = await gateway.post(captured_path, form)
    assert ElementTree.fromstring(await response.text()).find("./Connect") is not None
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)

    # The call lives on the newer stream. Replayed, the old reconnect used to count as the
    # call's second attempt, over max_reconnects: call.ended (error) for a call in progress.
    for _ in range(3):
        replay = await gateway.post(captured_path, form)
        assert replay.status == 200
        assert [c.tag for c in ElementTree.fromstring(await replay.text())] == ["Hangup"]
    await asyncio.sleep(0.3)
    assert events.of("call.ended", call_id) == []
    # and the voice webhook replayed hands out no token for the call
    voice = await gateway.post("/twilio/voice", {
        "CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": CASCADING_NUMBER,
        "Direction": "inbound", "CallStatus": "ringing"})
    assert [c.tag for c in ElementTree.fromstring(await voice.text())] == ["Hangup"]
    assert gateway.metric("gateway_replays_refused_total", carrier="twilio",
                          path="/twilio/voice/reconnect", kind="stale_connect") == 3
    assert gateway.metric("gateway_replays_refused_total", carrier="twilio",
                          path="/twilio/voice", kind="stale_connect") == 1
    assert await count_milestones(db, call_id, "reconnect:") == 1
    assert events.of("call.ended", call_id) == []
    assert live_calls(gateway)[call_id].stream_id == newer.stream_sid
    await newer.stop(call_sid)
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_reconnect_replayed_before_its_stream_starts_gets_no_token(make_gateway,
                                                                          events, db):
    """Replayed while Twilio is still connecting the new stream: the replayer gets neither a
    token of its own nor one in place of Twilio's, and no attempt is counted."""
    gateway = await make_gateway(max_reconnects=1)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.ws.close()
    path, form = reconnect_path(call_id), {"CallSid": call_sid}
    await gateway.post(path, form)
    twilios_token = stream_token(call_id)
    replay = await gateway.post(path, form)
    assert [c.tag for c in ElementTree.fromstring(await replay.text())] == ["Hangup"]
    assert await count_milestones(db, call_id, "reconnect:") == 1
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id, token=twilios_token)
    await events.wait("call.stream_started", call_id, count=2)
    assert events.of("call.ended", call_id) == []


async def test_a_voice_webhook_asked_again_before_its_stream_starts_gets_a_new_token(
        gateway, events):
    """Twilio asking the voice URL again (no answer seen): the call's first connect again,
    with a token replacing the first, which no stream can use then."""
    call_sid, call_id, _ = await gateway.inbound_call()
    first_token = stream_token(call_id)
    _, again_id, root = await gateway.inbound_call(call_sid=call_sid)
    assert again_id == call_id and root.find("./Connect/Stream") is not None
    assert stream_token(call_id) != first_token
    stale = StreamClient(await gateway.ws())
    await stale.start(call_sid, call_id, token=first_token)
    assert (await stale.closed())[0] == 4406
    stream = StreamClient(await gateway.ws())
    await stream.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id)


async def test_nonces_are_kept_for_their_window_then_swept(make_plivo_gateway, db):
    gateway = await make_plivo_gateway(plivo_nonce_window_s=0.3)
    params = _answer(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    assert (await gateway.post("/plivo/answer", params, headers=headers)).status == 200
    assert (await gateway.post("/plivo/answer", params, headers=headers)).status == 403
    await asyncio.sleep(0.4)
    assert await replays.expire(gateway.app) == 1
    cursor = await db.execute("SELECT count(*) FROM carrier_nonces")
    assert (await cursor.fetchone())[0] == 0
    # past the window a nonce is not known any more (V3 signatures carry no time: the call's
    # once-only milestones are what still hold then)
    assert (await gateway.post("/plivo/answer", params, headers=headers)).status == 200


async def test_a_plivo_request_that_failed_on_our_side_may_be_sent_again(plivo_gateway, db,
                                                                          events):
    """Plivo may send a request again after our 5xx: its nonce is given back, not kept."""
    params = _answer(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    await db.execute("ALTER TABLE carrier_calls RENAME TO carrier_calls_away")  # a failure
    try:
        failed = await plivo_gateway.post("/plivo/answer", params, headers=headers)
        assert failed.status == 500
    finally:
        await db.execute("ALTER TABLE carrier_calls_away RENAME TO carrier_calls")
    again = await plivo_gateway.post("/plivo/answer", params, headers=headers)
    assert again.status == 200, await again.text()
    await events.wait("call.requested")
    # done once, the same request is a replay
    assert (await plivo_gateway.post("/plivo/answer", params, headers=headers)).status == 403


async def test_a_replayed_conversation_relay_setup_is_refused(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call(MANAGED_NUMBER)
    setup = {"type": "setup", "sessionId": "VX" + "3" * 32, "accountSid": "AC",
             "from": CALLER, "to": MANAGED_NUMBER, "customParameters": {
                 "call_id": call_id, "org_id": ORG, "agent_id": MANAGED_AGENT,
                 "stream_token": stream_token(call_id)}}
    live = await gateway.ws("/twilio/relay")
    await live.send_json({**setup, "callSid": call_sid})
    await events.wait("call.stream_started", call_id)
    replay = await gateway.ws("/twilio/relay")
    await replay.send_json({**setup, "sessionId": "VX" + "4" * 32, "callSid": call_sid})
    assert await closed(replay) == (4406, "stream token already used")
    assert gateway.metric("gateway_replays_refused_total", carrier="twilio",
                          path="/twilio/relay", kind="stream_token") == 1
    assert len(events.of("call.stream_started", call_id)) == 1
    assert not live.closed
    await live.close()


async def test_a_reconnect_after_a_failed_dtmf_redirect_keeps_the_call(make_gateway, events,
                                                                       bus):
    """A DTMF redirect Twilio refused left the call on connect 0; when that socket then drops,
    Twilio's own <Connect action> (connect=0) is not a replay: the call reconnects."""
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    action = reconnect_path(call_id)  # what Twilio executes: connect 0's
    gateway.rest_fake.fail_updates_with = 500
    reply = await request(bus, call_id, "dtmf", {"digits": "1"})
    assert reply["ok"] is False
    gateway.rest_fake.fail_updates_with = None
    await stream.ws.close()  # the socket drops; Twilio asks connect 0's action
    await reconnects_then_ends(gateway, events, action, call_sid, call_id, streams=2)


async def test_a_stream_of_twiml_issued_before_the_deploy_is_accepted_once(make_gateway, events,
                                                                          db):
    """A rolling deploy: an instance of the old code answered the voice webhook (a <Connect>
    with no token, nothing in carrier_stream_tokens), and Twilio opens the stream to one of the
    new code. It is the call's stream, not a replay: accepted, once; and when it drops, the
    old TwiML's action (no connect=) reconnects the call."""
    gateway = await make_gateway()
    call_sid, call_id, _ = await gateway.inbound_call()
    await db.execute("DELETE FROM carrier_stream_tokens WHERE call_id = %s", (call_id,))
    stream = StreamClient(await gateway.ws())
    await stream.start(call_sid, call_id, token="")
    await events.wait("call.stream_started", call_id)
    replay = StreamClient(await gateway.ws())  # the same tokenless start replayed: refused
    await replay.start(call_sid, call_id, token="")
    assert await replay.closed() == (4406, "no stream token")
    voice = await gateway.post("/twilio/voice", {  # nor does a replayed voice webhook get one
        "CallSid": call_sid, "AccountSid": ACCOUNT, "From": CALLER, "To": CASCADING_NUMBER,
        "Direction": "inbound", "CallStatus": "ringing"})
    assert [c.tag for c in ElementTree.fromstring(await voice.text())] == ["Hangup"]
    assert live_calls(gateway)[call_id].stream_id == stream.stream_sid

    await stream.ws.close()
    await reconnects_then_ends(gateway, events, legacy_reconnect_path(call_id), call_sid,
                               call_id, streams=2)


async def test_a_plivo_request_cancelled_mid_way_gives_its_nonce_back(plivo_gateway, db):
    """A handler cancelled (the gateway stopping with the request in progress, its shutdown
    timeout past) answered nothing: Plivo sends it again, and it must be let through."""
    request = make_mocked_request("POST", "/plivo/hangup", app=plivo_gateway.app)
    nonce = "cancelled-" + new_call_uuid()
    assert await replays.claim_request_nonce(request, "plivo", nonce)

    async def handler(_request):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await replays.give_back_nonces(request, handler)
    cursor = await db.execute("SELECT count(*) FROM carrier_nonces WHERE nonce_sha256 = %s",
                              (replays.digest(nonce),))
    assert (await cursor.fetchone())[0] == 0


async def test_while_tokens_are_not_enforced_a_mixed_fleet_keeps_its_calls(make_gateway, events):
    """The first phase of a rolling deploy (gateway_stream_tokens_enforced off): a call answered
    by the new code (connect 0 used) reconnected by an instance of the older code, whose TwiML
    carries no token and whose action names no connect. Enforced, its stream is refused 4406
    and that action answered <Hangup/>: the caller is hung up. Not enforced, both go through."""
    gateway = await make_gateway(gateway_stream_tokens_enforced=False)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.ws.close()
    # the older code's reconnect TwiML: no token; its stream reaches a new instance
    older = StreamClient(await gateway.ws())
    await older.start(call_sid, call_id, token="")
    await events.wait("call.stream_started", call_id, count=2)
    await older.ws.close()
    await reconnects_then_ends(gateway, events, legacy_reconnect_path(call_id), call_sid,
                               call_id, streams=3)


async def test_the_gateway_sweeps_expired_nonces_on_its_own(make_plivo_gateway, db):
    """The sweep loop the app runs (not expire() called by hand) deletes what has expired."""
    gateway = await make_plivo_gateway(plivo_nonce_window_s=0.2, gateway_idempotency_sweep_s=0.1)
    params = _answer(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    assert (await gateway.post("/plivo/answer", params, headers=headers)).status == 200
    for _ in range(50):
        cursor = await db.execute("SELECT count(*) FROM carrier_nonces")
        if (await cursor.fetchone())[0] == 0:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the expired nonce was never swept")
