"""Signed requests captured and sent again: refused, whichever instance they reach.

A carrier's signature binds a request's URL and parameters, not when it was sent: Plivo's V3
nonce is remembered across instances (Postgres) so a webhook or upgrade replayed is refused;
a Twilio Media Streams upgrade (signed over a URL without parameters, so the same for every
call) opens a stream only with the one-time token the call's <Connect> carried; and a replayed
<Connect action> of a stream long replaced cannot count as a reconnect nor end the call.
"""

from urllib.parse import urlencode

from . import test_plivo_support as support
from .conftest import PUBLIC
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
