import xml.etree.ElementTree as ElementTree
from urllib.parse import parse_qs, urlsplit

import pytest

from parley.common.configuration import update_agent
from parley.gateway.calls import find_by_call_id, find_by_carrier_id
from parley.gateway.twilio.twiml import outbound_callback_urls

from .conftest import (
    ACCOUNT,
    CALLER,
    CASCADING_AGENT,
    MANAGED_AGENT,
    MANAGED_NUMBER,
    ORG,
    PUBLIC,
    new_call_sid,
    reconnect_path,
    stream_token,
    wait_for,
)


async def test_inbound_cascading_twiml_connects_a_stream(gateway, events, db):
    call_sid, call_id, root = await gateway.inbound_call()

    assert root.tag == "Response"
    [connect] = list(root)
    assert connect.tag == "Connect"
    action = urlsplit(connect.get("action"))
    assert f"{action.scheme}://{action.netloc}{action.path}" == \
        PUBLIC + "/twilio/voice/reconnect"
    assert parse_qs(action.query) == {"call_id": [call_id], "connect": ["0"]}
    [stream] = list(connect)
    assert stream.tag == "Stream"
    assert stream.get("url") == "wss://voice.example.com/twilio/stream"
    params = {p.get("name"): p.get("value") for p in stream.iter("Parameter")}
    token = params.pop("stream_token")  # one-time, for the stream's start (replays.py)
    assert len(token) >= 40 and token == stream_token(call_id)
    assert params == {"call_id": call_id, "org_id": ORG, "agent_id": CASCADING_AGENT}
    assert call_id.startswith("call_") and len(call_id) == 5 + 32

    [requested] = await events.wait("call.requested", call_id)
    assert requested.direction == "inbound" and requested.agent_id == CASCADING_AGENT
    assert requested.from_number == CALLER and requested.carrier_call_id == call_sid
    await events.wait("call.answered", call_id)
    row = await find_by_carrier_id(db, "twilio", call_sid)
    assert row.call_id == call_id and row.org_id == ORG and row.direction == "inbound"
    assert row.answered_at is not None and row.ended_at is None


async def test_inbound_managed_twiml_uses_conversation_relay(gateway, events):
    _, call_id, root = await gateway.inbound_call(MANAGED_NUMBER)
    relay = root.find("./Connect/ConversationRelay")
    assert relay is not None
    assert relay.get("url") == "wss://voice.example.com/twilio/relay"
    assert relay.get("voice") == "en-US-Journey-O"
    assert relay.get("language") == "en-GB"
    assert relay.get("welcomeGreeting") == "Hi, Acme here."
    assert relay.get("interruptible") == "any"
    assert relay.get("interruptSensitivity") == "high"
    # what tells the relay a turn has played out (agent.speech.finished)
    assert relay.get("events") == "speaker-events tokens-played"
    assert relay.get("partialPrompts") == "true"  # the caller's words as they speak
    params = {p.get("name"): p.get("value") for p in relay.iter("Parameter")}
    assert params.pop("stream_token") == stream_token(call_id)
    assert params == {"call_id": call_id, "org_id": ORG, "agent_id": MANAGED_AGENT}
    assert root.find("./Connect").get("action").endswith(
        f"reconnect?call_id={call_id}&connect=0")


async def test_unknown_number_says_so_and_hangs_up(gateway, events):
    response = await gateway.post("/twilio/voice", {
        "CallSid": new_call_sid(), "From": CALLER, "To": "+14155550199"})
    assert response.status == 200
    root = ElementTree.fromstring(await response.text())
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert "not in service" in root.find("Say").text
    assert not events.of("call.requested")
    assert gateway.metric("gateway_webhooks_total", route="/twilio/voice",
                          outcome="unknown_number") == 1


async def test_voice_retry_reuses_the_call_and_emits_once(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    again_sid, again_id, _ = await gateway.inbound_call(call_sid=call_sid)
    assert again_id == call_id
    await events.wait("call.answered", call_id)
    await gateway.post("/twilio/status", {"CallSid": call_sid, "CallStatus": "in-progress"})
    await wait_for(lambda: gateway.metric("gateway_webhooks_total", route="/twilio/status",
                                          outcome="in-progress") == 1)
    assert len(events.of("call.requested", call_id)) == 1
    assert len(events.of("call.answered", call_id)) == 1


async def test_missing_call_sid_is_a_400_problem(gateway):
    response = await gateway.post("/twilio/voice", {"To": MANAGED_NUMBER})
    assert response.status == 400
    assert (await response.json())["detail"] == "missing form field CallSid"
    # $ in a pattern matches before a final newline: a CallSid must be matched whole
    response = await gateway.post("/twilio/voice", {"To": MANAGED_NUMBER,
                                                    "CallSid": "CA" + "0" * 32 + "\n"})
    assert response.status == 400
    assert (await response.json())["detail"] == "CallSid is not CA followed by 32 hex digits"


async def test_outbound_answer_uses_the_signed_query_ids(gateway, events, db):
    urls = outbound_callback_urls(gateway.config, call_id="call_out1", org_id=ORG,
                                  agent_id=MANAGED_AGENT)
    call_sid = new_call_sid()
    voice = urls["url"].removeprefix(PUBLIC)
    response = await gateway.post(voice, {"CallSid": call_sid, "AccountSid": ACCOUNT,
                                          "From": MANAGED_NUMBER, "To": CALLER,
                                          "Direction": "outbound-api"})
    assert response.status == 200
    root = ElementTree.fromstring(await response.text())
    assert root.find("./Connect/ConversationRelay") is not None
    await events.wait("call.answered", "call_out1")
    assert not events.of("call.requested")  # the outbound API emitted it
    row = await find_by_call_id(db, "call_out1")
    assert row.carrier_call_id == call_sid and row.direction == "outbound"


async def test_status_callbacks_map_to_events_once_each(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    for status in ["initiated", "ringing", "ringing", "in-progress", "completed", "completed"]:
        response = await gateway.post("/twilio/status", {
            "CallSid": call_sid, "CallStatus": status, "CallDuration": "42"})
        assert response.status == 204
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "completed" and ended.duration_s == 42.0
    assert len(events.of("call.ringing", call_id)) == 1
    assert len(events.of("call.answered", call_id)) == 1
    assert len(events.of("call.ended", call_id)) == 1


@pytest.mark.parametrize(("status", "reason"), [("busy", "busy"), ("no-answer", "no_answer"),
                                                ("failed", "failed"), ("canceled", "canceled")])
async def test_unanswered_outbound_calls_fail(gateway, events, status, reason):
    urls = outbound_callback_urls(gateway.config, call_id="call_out2", org_id=ORG,
                                  agent_id=CASCADING_AGENT)
    path = urls["status_callback"].removeprefix(PUBLIC)
    response = await gateway.post(path, {"CallSid": new_call_sid(), "CallStatus": status})
    assert response.status == 204
    [failed] = await events.wait("call.failed", "call_out2")
    assert failed.reason == reason and failed.carrier_status == status
    assert not events.of("call.ended")


async def test_status_for_an_unknown_call_is_404(gateway):
    response = await gateway.post("/twilio/status", {"CallSid": new_call_sid(),
                                                     "CallStatus": "ringing"})
    assert response.status == 404
    assert (await response.json())["type"].endswith("/unknown-call")


async def test_reconnect_gives_a_live_call_a_new_stream_and_an_ended_one_a_hangup(
        gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    path = reconnect_path(call_id)
    response = await gateway.post(path, {"CallSid": call_sid, "CallStatus": "in-progress"})
    root = ElementTree.fromstring(await response.text())
    stream = root.find("./Connect/Stream")
    assert {p.get("name"): p.get("value") for p in stream.iter("Parameter")}["call_id"] == \
        call_id

    await gateway.post("/twilio/status", {"CallSid": call_sid, "CallStatus": "completed"})
    response = await gateway.post(path, {"CallSid": call_sid, "CallStatus": "completed"})
    assert [child.tag for child in ElementTree.fromstring(await response.text())] == ["Hangup"]

    response = await gateway.post("/twilio/voice/reconnect?call_id=call_nope",
                                  {"CallSid": call_sid})
    assert [child.tag for child in ElementTree.fromstring(await response.text())] == ["Hangup"]


async def test_a_managed_call_back_on_a_new_socket_is_not_greeted_again(gateway, events):
    # ConversationRelay says welcomeGreeting as the caller connects: the reconnect TwiML gave
    # it again, so a managed caller whose socket dropped heard "Hi, Acme here." mid-call.
    call_sid, call_id, root = await gateway.inbound_call(MANAGED_NUMBER)
    assert root.find("./Connect/ConversationRelay").get("welcomeGreeting") == "Hi, Acme here."
    response = await gateway.post(reconnect_path(call_id),
                                  {"CallSid": call_sid, "CallStatus": "in-progress"})
    relay = ElementTree.fromstring(await response.text()).find("./Connect/ConversationRelay")
    assert relay is not None and relay.get("welcomeGreeting") is None
    assert relay.get("events") == "speaker-events tokens-played"


async def test_reconnects_are_capped(make_gateway, events):
    gateway = await make_gateway(max_reconnects=2)
    call_sid, call_id, _ = await gateway.inbound_call()
    tags = []
    for _ in range(3):  # each through the action of the <Connect> the one before answered
        response = await gateway.post(reconnect_path(call_id), {"CallSid": call_sid})
        tags.append(ElementTree.fromstring(await response.text())[0].tag)
    assert tags == ["Connect", "Connect", "Hangup"]
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "error"


async def test_amd_human_continues(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    response = await gateway.post("/twilio/amd", {"CallSid": call_sid, "AnsweredBy": "human"})
    assert response.status == 204
    [detected] = await events.wait("call.machine_detected", call_id)
    assert detected.answered_by == "human" and detected.action == "continue"


async def test_amd_machine_with_hangup_policy_without_rest_only_reports(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    for _ in range(2):  # Twilio retries: one event
        await gateway.post("/twilio/amd", {"CallSid": call_sid,
                                           "AnsweredBy": "machine_end_beep"})
    [detected] = await events.wait("call.machine_detected", call_id)
    assert detected.action == "hangup"
    assert not events.of("call.ended", call_id)


async def test_amd_machine_hangs_up_through_the_rest_api(make_gateway, events):
    gateway = await make_gateway(rest=True)
    call_sid, call_id, _ = await gateway.inbound_call()
    await gateway.post("/twilio/amd", {"CallSid": call_sid, "AnsweredBy": "machine_start"})
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "machine"
    await wait_for(lambda: gateway.rest_fake.updates)  # (call.ended is published first)
    assert gateway.rest_fake.updates == [(call_sid, {"Status": "completed"})]


async def test_amd_machine_leaves_the_voicemail_message(make_gateway, events, db):
    gateway = await make_gateway(rest=True)
    await update_agent(db, ORG, CASCADING_AGENT, {"machine_policy": "leave_message",
                                                  "voicemail_message": "Please call back."})
    call_sid, call_id, _ = await gateway.inbound_call()
    await gateway.post("/twilio/amd", {"CallSid": call_sid, "AnsweredBy": "machine_end_beep"})
    [detected] = await events.wait("call.machine_detected", call_id)
    assert detected.action == "leave_message"
    await events.wait("call.ended", call_id)
    [(sid, form)] = gateway.rest_fake.updates
    root = ElementTree.fromstring(form["Twiml"])
    assert [c.tag for c in root] == ["Say", "Hangup"] and root[0].text == "Please call back."


async def test_amd_rejects_unknown_answered_by(gateway):
    call_sid, _, _ = await gateway.inbound_call()
    response = await gateway.post("/twilio/amd", {"CallSid": call_sid, "AnsweredBy": "robot"})
    assert response.status == 400


async def test_recording_callback_emits_once(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    form = {"CallSid": call_sid, "RecordingSid": "RE" + "1" * 32, "RecordingStatus": "completed",
            "RecordingUrl": "https://api.twilio.com/2010-04-01/Accounts/AC/Recordings/RE1",
            "RecordingDuration": "17"}
    for _ in range(2):
        assert (await gateway.post("/twilio/recording", form)).status == 204
    [recording] = await events.wait("call.recording_available", call_id)
    assert recording.recording_sid == form["RecordingSid"]
    assert recording.url == form["RecordingUrl"] and recording.duration_s == 17.0
    await gateway.post("/twilio/recording", {**form, "RecordingSid": "RE2",
                                             "RecordingStatus": "failed"})
    assert len(events.of("call.recording_available", call_id)) == 1
