import asyncio
import base64
import io
import wave
from collections.abc import AsyncIterator

import aiohttp
import pytest
from twilio.base.exceptions import TwilioRestException

from parley.devkit.telephony.call_script import CallScript, Utterance
from parley.devkit.telephony.emulated_call import Callee
from parley.devkit.telephony.twilio_emulator import EMULATOR, TwilioEmulator, create_emulator_app
from parley.devkit.telephony.twilio_sdk import SessionHttpClient, twilio_client_for

from .conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, StandInGateway, serve

CALLEE = "+15550142"
CREDENTIALS = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
AUTH = {"Authorization": f"Basic {CREDENTIALS}"}


@pytest.fixture
async def emulator(
        gateway: tuple[StandInGateway, str]) -> AsyncIterator[tuple[TwilioEmulator, str]]:
    _, gateway_url = gateway
    app = create_emulator_app(gateway_url=gateway_url, public_url=PUBLIC_URL,
                              auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    url, cleanup = await serve(app)
    yield app[EMULATOR], url
    await cleanup()


def create_call(emulator_url: str, **options: object):
    """The real, synchronous SDK (in a thread, as the emulator runs on this loop)."""
    client = twilio_client_for(emulator_url, ACCOUNT_SID, AUTH_TOKEN)
    try:
        return client.calls.create(**options)
    finally:
        client.http_client.session.close()


async def test_the_sdk_creates_a_call_and_the_emulator_dials_the_gateway(
        emulator: tuple[TwilioEmulator, str], gateway: tuple[StandInGateway, str]) -> None:
    state, url = emulator
    stand_in, _ = gateway
    state.callees[CALLEE] = Callee(
        answered_by="machine_start", machine_detection_seconds=0.1,
        script=CallScript(utterances=(Utterance(audio=b"\x20" * 1600, label="hi", pause=0.1),),
                          hang_up_when_done=False))
    call = await asyncio.to_thread(
        create_call, url, to=CALLEE, from_="+15550199", url=f"{PUBLIC_URL}/twilio/voice",
        status_callback=f"{PUBLIC_URL}/twilio/status",
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        machine_detection="Enable", async_amd="true",
        async_amd_status_callback=f"{PUBLIC_URL}/twilio/amd",
        record=True, recording_channels="dual",
        recording_status_callback=f"{PUBLIC_URL}/twilio/recording")
    assert call.sid.startswith("CA") and len(call.sid) == 34
    assert call.status == "queued" and call.to == CALLEE and call.direction == "outbound-api"

    await asyncio.wait_for(stand_in.mark_echoed.wait(), 5)
    await asyncio.sleep(0.6)  # the callee speaks and the agent replies
    async with aiohttp.ClientSession() as session:
        client = twilio_client_for(url, ACCOUNT_SID, AUTH_TOKEN,
                                   http_client=SessionHttpClient(session))
        live = await client.calls(call.sid).fetch_async()
        assert live.status == "in-progress" and live.answered_by == "machine_start"
        await client.calls(call.sid).update_async(status="completed")
    ended = await asyncio.wait_for(state.wait_for_call(call.sid), 5)
    assert ended.status == "completed" and ended.errors == []

    statuses = [hook.params["CallStatus"] for hook in stand_in.hooks("/twilio/status")]
    assert statuses == ["initiated", "ringing", "in-progress", "completed"]
    completed = stand_in.hooks("/twilio/status")[-1].params
    assert int(completed["CallDuration"]) >= 0 and completed["CallSid"] == call.sid
    voice, = stand_in.hooks("/twilio/voice")
    assert voice.params["Direction"] == "outbound-api"
    assert voice.params["CallStatus"] == "in-progress"
    amd, = stand_in.hooks("/twilio/amd")
    assert amd.params["AnsweredBy"] == "machine_start"
    assert all(hook.signature_valid for hook in stand_in.webhooks)
    assert stand_in.websocket_signature_valid

    events = stand_in.events()
    assert events[:3] == ["connected", "start", "media"] and events[-1] == "stop"
    assert set(events) == {"connected", "start", "media", "mark", "stop"}
    start = stand_in.messages[1][1]["start"]
    assert start["callSid"] == call.sid and start["accountSid"] == ACCOUNT_SID
    assert start["customParameters"] == {"call_id": f"c-{call.sid[-6:]}", "org": "o1"}
    marks = [message["mark"]["name"] for _, message in stand_in.messages
             if message["event"] == "mark"]
    assert marks == ["greeting", "reply-1"]

    recording, = stand_in.hooks("/twilio/recording")
    assert recording.params["RecordingStatus"] == "completed"
    assert recording.params["RecordingSid"].startswith("RE")
    async with aiohttp.ClientSession() as session:
        async with session.get(recording.params["RecordingUrl"] + ".wav") as response:
            assert response.status == 200
            audio = await response.read()
    with wave.open(io.BytesIO(audio)) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        assert wav.getnframes() / 8000 >= 0.4


async def test_bad_credentials_are_refused_with_twilios_401(
        emulator: tuple[TwilioEmulator, str]) -> None:
    _, url = emulator

    def create_with_wrong_token() -> None:
        client = twilio_client_for(url, ACCOUNT_SID, "not-the-token")
        try:
            client.calls.create(to=CALLEE, from_="+15550199", url=f"{PUBLIC_URL}/twilio/voice")
        finally:
            client.http_client.session.close()

    with pytest.raises(TwilioRestException) as refused:
        await asyncio.to_thread(create_with_wrong_token)
    assert refused.value.status == 401 and refused.value.code == 20003


async def test_missing_parameters_get_twilios_400_errors(
        emulator: tuple[TwilioEmulator, str]) -> None:
    _, url = emulator
    with pytest.raises(TwilioRestException) as no_url:
        await asyncio.to_thread(create_call, url, to=CALLEE, from_="+15550199")
    assert (no_url.value.status, no_url.value.code) == (400, 21205)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json",
                                data={"From": "+15550199", "Url": "https://x.test/"},
                                headers=AUTH) as response:
            assert response.status == 400
            assert await response.json() == {
                "code": 21201, "message": "No 'To' number is specified",
                "more_info": "https://www.twilio.com/docs/errors/21201", "status": 400}
        missing = f"{url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/CA{'0' * 32}.json"
        async with session.get(missing, headers=AUTH) as gone:
            assert gone.status == 404 and (await gone.json())["code"] == 20404


async def test_a_busy_callee_ends_the_call_without_answering(
        emulator: tuple[TwilioEmulator, str], gateway: tuple[StandInGateway, str]) -> None:
    state, url = emulator
    stand_in, _ = gateway
    state.callees[CALLEE] = Callee(outcome="busy")
    call = await asyncio.to_thread(create_call, url, to=CALLEE, from_="+15550199",
                                   url=f"{PUBLIC_URL}/twilio/voice",
                                   status_callback=f"{PUBLIC_URL}/twilio/status")
    ended = await asyncio.wait_for(state.wait_for_call(call.sid), 5)
    assert ended.status == "busy"
    assert [hook.params["CallStatus"] for hook in stand_in.webhooks] == ["busy"]


async def test_recording_a_live_call_then_redirecting_it_to_new_twiml(
        emulator: tuple[TwilioEmulator, str], gateway: tuple[StandInGateway, str]) -> None:
    state, url = emulator
    stand_in, _ = gateway
    call = await asyncio.to_thread(create_call, url, to=CALLEE, from_="+15550199",
                                   url=f"{PUBLIC_URL}/twilio/voice")
    await asyncio.wait_for(stand_in.mark_echoed.wait(), 5)
    async with aiohttp.ClientSession() as session:
        client = twilio_client_for(url, ACCOUNT_SID, AUTH_TOKEN,
                                   http_client=SessionHttpClient(session))
        recording = await client.calls(call.sid).recordings.create_async(
            recording_status_callback=f"{PUBLIC_URL}/twilio/recording",
            recording_channels="dual")
        assert recording.sid.startswith("RE") and recording.status == "in-progress"
        await asyncio.sleep(0.3)
        await client.calls(call.sid).update_async(
            twiml="<Response><Pause length=\"0.1\"/><Hangup/></Response>")
    ended = await asyncio.wait_for(state.wait_for_call(call.sid), 5)
    assert ended.status == "completed" and stand_in.events()[-1] == "stop"
    callback, = stand_in.hooks("/twilio/recording")
    assert callback.params["RecordingSid"] == recording.sid
    assert callback.params["RecordingSource"] == "StartCallRecordingAPI"
    with wave.open(io.BytesIO(state.recordings[recording.sid])) as wav:
        assert wav.getnchannels() == 2 and 0.2 <= wav.getnframes() / 8000 < 1.5


async def test_sync_amd_reaches_the_answer_url_and_the_callee_can_hang_up(
        emulator: tuple[TwilioEmulator, str], gateway: tuple[StandInGateway, str]) -> None:
    state, url = emulator
    stand_in, _ = gateway
    state.callees[CALLEE] = Callee(machine_detection_seconds=0.05,
                                   script=CallScript(hangup_after=0.3))
    call = await asyncio.to_thread(create_call, url, to=CALLEE, from_="+15550199",
                                   url=f"{PUBLIC_URL}/twilio/voice", machine_detection="Enable",
                                   status_callback=f"{PUBLIC_URL}/twilio/status")
    ended = await asyncio.wait_for(state.wait_for_call(call.sid), 5)
    assert ended.status == "completed" and ended.answered_by == "human"
    voice, = stand_in.hooks("/twilio/voice")
    assert voice.params["AnsweredBy"] == "human"
    status, = stand_in.hooks("/twilio/status")  # only "completed" unless events are asked for
    assert status.params["CallStatus"] == "completed" and "CallDuration" in status.params
    assert stand_in.events()[-1] == "stop"
