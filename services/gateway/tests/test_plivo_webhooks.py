import xml.etree.ElementTree as ElementTree

import pytest
from plivo.utils import validate_v3_signature

from parley.gateway.calls import find_by_call_id

from . import test_plivo_support as support
from .conftest import CASCADING_AGENT, ORG, PUBLIC
from .test_plivo_support import (
    PLIVO_CALLER,
    PLIVO_NUMBER,
    PLIVO_TOKEN,
    new_call_uuid,
    plivo_signature,
    signed_headers,
)

# the shared Plivo fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_gateway = support.plivo_gateway
plivo_number = support.plivo_number


def answer_params(call_uuid: str, to: str = PLIVO_NUMBER) -> dict[str, str]:
    return {"CallUUID": call_uuid, "From": PLIVO_CALLER, "To": to, "Direction": "inbound",
            "CallStatus": "in-progress", "Event": "StartApp"}


def test_our_signing_matches_the_sdk_validator():
    url, params = PUBLIC + "/plivo/answer", answer_params("abc")
    signature = plivo_signature("POST", url, params, nonce="12345")
    assert validate_v3_signature("POST", url, "12345", PLIVO_TOKEN, signature, params)


async def test_inbound_answer_streams_to_our_socket(plivo_gateway, events, db):
    call_uuid, call_id, root = await plivo_gateway.answer()
    assert root.tag == "Response"
    stream, redirect = list(root)
    assert stream.tag == "Stream"
    assert stream.attrib == {
        "bidirectional": "true", "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000", "streamTimeout": "60",
        "statusCallbackUrl": f"{PUBLIC}/plivo/stream-status?call_id={call_id}",
        "statusCallbackMethod": "POST"}
    assert stream.text == f"wss://voice.example.com/plivo/stream?call_id={call_id}"
    assert redirect.tag == "Redirect" and redirect.get("method") == "POST"
    assert redirect.text == f"{PUBLIC}/plivo/answer?call_id={call_id}&reconnect=1"

    [requested] = await events.wait("call.requested", call_id)
    assert (requested.direction, requested.carrier, requested.carrier_call_id) == (
        "inbound", "plivo", call_uuid)
    assert (requested.from_number, requested.to_number) == (PLIVO_CALLER, PLIVO_NUMBER)
    assert (requested.org_id, requested.agent_id) == (ORG, CASCADING_AGENT)
    await events.wait("call.answered", call_id)
    call = await find_by_call_id(db, call_id)
    assert call is not None and (call.carrier, call.carrier_call_id) == ("plivo", call_uuid)
    assert call.answered_at is not None


async def test_answer_retry_reuses_the_call_and_emits_once(plivo_gateway, events):
    call_uuid, call_id, _ = await plivo_gateway.answer()
    _, again, _ = await plivo_gateway.answer(call_uuid=call_uuid)
    assert again == call_id
    await events.wait("call.answered", call_id)
    assert len(events.of("call.requested", call_id)) == 1
    assert len(events.of("call.answered", call_id)) == 1


async def test_unknown_number_speaks_and_hangs_up(plivo_gateway, events):
    _, call_id, root = await plivo_gateway.answer(number="+14155550199")
    assert call_id == ""
    assert [child.tag for child in root] == ["Speak", "Hangup"]
    assert "not in service" in root.find("Speak").text
    assert events.of("call.requested") == []


async def test_signature_from_the_sdk_helper_is_accepted_and_one_char_off_is_not(
        plivo_gateway, events):
    params = answer_params(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    good = headers["X-Plivo-Signature-V3"]
    tampered = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
    response = await plivo_gateway.post("/plivo/answer", params, headers={
        **headers, "X-Plivo-Signature-V3": tampered})
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == 403 and "X-Plivo-Signature-V3" in problem["detail"]
    [rejected] = await events.wait("security.signature_rejected")
    assert (rejected.carrier, rejected.path, rejected.org_id) == ("plivo", "/plivo/answer", ORG)
    assert events.of("call.requested") == []
    assert plivo_gateway.metric("gateway_signature_rejections_total", carrier="plivo",
                                path="/plivo/answer") == 1

    response = await plivo_gateway.post("/plivo/answer", params, headers=headers)
    assert response.status == 200
    await events.wait("call.requested")


@pytest.mark.parametrize("tamper", ["param", "nonce", "url", "missing", "no_nonce"])
async def test_tampered_requests_are_rejected(plivo_gateway, events, tamper):
    params = answer_params(new_call_uuid())
    headers = signed_headers("POST", PUBLIC + "/plivo/answer", params)
    path = "/plivo/answer"
    if tamper == "param":
        params["From"] = "+14155559997"
    elif tamper == "nonce":
        headers["X-Plivo-Signature-V3-Nonce"] += "1"
    elif tamper == "url":
        path = "/plivo/answer?x=1"
    elif tamper == "missing":
        del headers["X-Plivo-Signature-V3"]
    else:
        del headers["X-Plivo-Signature-V3-Nonce"]
    response = await plivo_gateway.post(path, params, headers=headers)
    assert response.status == 403
    await events.wait("security.signature_rejected")
    assert events.of("call.requested") == []


@pytest.mark.parametrize("path", ["/plivo/answer", "/plivo/hangup", "/plivo/ring",
                                  "/plivo/stream-status", "/plivo/transfer"])
async def test_every_callback_checks_the_signature(plivo_gateway, events, path):
    response = await plivo_gateway.post(path, {"CallUUID": new_call_uuid()}, headers={})
    assert response.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.reason == "missing X-Plivo-Signature-V3"


async def test_without_an_auth_token_everything_is_refused(make_plivo_gateway, events):
    gateway = await make_plivo_gateway(plivo_auth_token="")
    response = await gateway.post("/plivo/answer", answer_params(new_call_uuid()))
    assert response.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.reason == "no Plivo auth token configured"


async def test_hangup_ends_the_call_once_with_its_duration(plivo_gateway, events):
    call_uuid, call_id, _ = await plivo_gateway.answer()
    hangup = {"CallUUID": call_uuid, "CallStatus": "completed", "Duration": "42",
              "BillDuration": "60", "HangupSource": "Caller", "HangupCause": "NORMAL_CLEARING"}
    for _ in range(2):
        response = await plivo_gateway.post("/plivo/hangup", hangup)
        assert response.status == 204
    [ended] = await events.wait("call.ended", call_id)
    assert (ended.reason, ended.duration_s) == ("caller_hangup", 42.0)
    # after the end, a reconnect through the redirect only hangs up
    _, _, root = await plivo_gateway.answer(call_uuid=call_uuid, path=f"/plivo/answer?"
                                            f"call_id={call_id}&reconnect=1")
    assert [child.tag for child in root] == ["Hangup"]
    assert len(events.of("call.ended", call_id)) == 1


async def test_hangup_for_an_unknown_call_is_404(plivo_gateway):
    response = await plivo_gateway.post("/plivo/hangup", {"CallUUID": new_call_uuid(),
                                                          "CallStatus": "completed"})
    assert response.status == 404
    assert (await response.json())["type"].endswith("unknown-call")


async def test_missing_call_uuid_is_a_400_problem(plivo_gateway):
    response = await plivo_gateway.post("/plivo/answer", {"To": PLIVO_NUMBER})
    assert response.status == 400
    assert "CallUUID" in (await response.json())["detail"]


async def test_redirect_reconnects_a_live_call_and_is_capped(make_plivo_gateway, events):
    gateway = await make_plivo_gateway(max_reconnects=1)
    call_uuid, call_id, _ = await gateway.answer()
    path = f"/plivo/answer?call_id={call_id}&reconnect=1"
    _, again, root = await gateway.answer(call_uuid=call_uuid, path=path)
    assert again == call_id and root.find("Stream") is not None
    _, _, root = await gateway.answer(call_uuid=call_uuid, path=path)
    assert [child.tag for child in root] == ["Hangup"]
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "error"
    assert len(events.of("call.answered", call_id)) == 1


async def test_a_retried_first_answer_is_answered_again_and_is_no_reconnect(
        make_plivo_gateway, events):
    # Our first answer was slow and Plivo asked the answer URL again (no call_id in it) after
    # the call was answered: the retry was counted as a reconnect, and the call's one allowed
    # reconnect was used up before its socket ever dropped.
    gateway = await make_plivo_gateway(max_reconnects=1)
    call_uuid, call_id, first = await gateway.answer()
    _, again, retried = await gateway.answer(call_uuid=call_uuid)
    assert again == call_id
    assert ElementTree.tostring(retried) == ElementTree.tostring(first)
    # the socket drops: the redirect reconnects the call, once
    path = f"/plivo/answer?call_id={call_id}&reconnect=1"
    _, _, root = await gateway.answer(call_uuid=call_uuid, path=path)
    assert root.find("Stream") is not None
    assert not events.of("call.ended", call_id)
    assert len(events.of("call.answered", call_id)) == 1


async def test_stream_status_is_accepted_and_counted(plivo_gateway, events):
    call_uuid, call_id, _ = await plivo_gateway.answer()
    for event in ("StartStream", "DroppedStream"):
        response = await plivo_gateway.post(f"/plivo/stream-status?call_id={call_id}", {
            "Event": event, "CallUUID": call_uuid, "StreamID": "s-1", "Error": "timeout"})
        assert response.status == 204
    assert plivo_gateway.metric("gateway_webhooks_total", route="/plivo/stream-status",
                                outcome="DroppedStream") == 1


async def test_transfer_xml_dials_the_number(plivo_gateway):
    response = await plivo_gateway.post("/plivo/transfer?call_id=c1&to=%2B14155550123", {
        "CallUUID": new_call_uuid()})
    assert response.status == 200
    assert await response.text() == ("<Response><Dial><Number>+14155550123</Number></Dial>"
                                      "</Response>")
    response = await plivo_gateway.post("/plivo/transfer?call_id=c1&to=nope", {
        "CallUUID": new_call_uuid()})
    assert response.status == 400


async def test_a_query_the_sdk_cannot_parse_is_a_403_not_a_crash(plivo_gateway, events):
    # found by the fuzz test: the SDK's helper raises on non-ASCII escapes in the query
    response = await plivo_gateway.post("/plivo/answer?call_id=%C2%80", answer_params(
        new_call_uuid()), headers={"X-Plivo-Signature-V3": "x",
                                   "X-Plivo-Signature-V3-Nonce": "1"})
    assert response.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert rejected.reason == "invalid X-Plivo-Signature-V3"


async def test_a_nul_character_in_a_signed_callback_is_a_400_not_a_crash(plivo_gateway, events):
    # Postgres text cannot hold NUL: it reached the carrier_calls insert and answered 500,
    # which Plivo retries and then plays to the caller as an application error
    params = {**answer_params(new_call_uuid()), "From": "+1415\x00"}
    response = await plivo_gateway.post("/plivo/answer", params)
    assert response.status == 400
    assert "NUL" in (await response.json())["detail"]
    assert not events.of("call.requested")
