import asyncio
import wave

import numpy as np
import pytest
from twilio.request_validator import RequestValidator

from parley.devkit.telephony.audio_codec import wav_bytes
from parley.devkit.telephony.call_script import CallScript, KeyPress, Utterance
from parley.devkit.telephony.caller_simulator import CallerSimulator
from parley.devkit.telephony.twilio_protocol import parse_twilio_message
from parley.devkit.telephony.webhook_client import WebhookError

from .conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, SILENT, StandInGateway, tone


class FakeClock:
    """Time moves only when the simulator sleeps: a whole call runs in milliseconds."""

    def __init__(self) -> None:
        self.time = 1000.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.time += seconds
        await asyncio.sleep(0)


def speech_wav(path, seconds=0.3, rate=16000):
    path.write_bytes(wav_bytes([tone(440, seconds, rate=rate)], rate=rate))
    return path


def simulator(url, script, **options):
    return CallerSimulator(gateway_url=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                           account_sid=ACCOUNT_SID, from_number="+15550100",
                           to_number="+15550199", script=script, **options)


async def test_a_call_is_signed_paced_at_50_frames_a_second_and_recorded_in_stereo(
        gateway: tuple[StandInGateway, str], tmp_path) -> None:
    stand_in, url = gateway
    hello = Utterance.from_wav(speech_wav(tmp_path / "hello.wav"), pause=0.1)
    lines = []
    result = await simulator(url, CallScript(utterances=(hello,), reply_timeout=2.0),
                             wav_path=tmp_path / "call.wav",
                             log=lambda at, text: lines.append(text)).run()

    voice = stand_in.hooks("/twilio/voice")[0]
    assert voice.signature_valid and stand_in.websocket_signature_valid
    assert voice.params["CallStatus"] == "ringing" and voice.params["Direction"] == "inbound"
    assert voice.params["From"] == "+15550100" and voice.params["ApiVersion"] == "2010-04-01"
    validator = RequestValidator(AUTH_TOKEN)  # what the simulator signed, changed by one char
    assert validator.validate(voice.url, voice.params, voice.signature)
    assert not validator.validate(voice.url, {**voice.params, "To": "+15550198"}, voice.signature)
    assert not validator.validate(voice.url + "x", voice.params, voice.signature)

    events = stand_in.events()
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    start = stand_in.messages[1][1]
    assert start["start"]["customParameters"] == {"call_id": f"c-{result.call_sid[-6:]}",
                                                  "org": "o1"}
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                             "channels": 1}
    numbers = [int(message["sequenceNumber"]) for _, message in stand_in.messages[1:]]
    assert numbers == list(range(1, len(numbers) + 1))

    media = [(at, message) for at, message in stand_in.messages if message["event"] == "media"]
    assert [int(m["media"]["timestamp"]) for _, m in media] == [20 * i for i in range(len(media))]
    assert [int(m["media"]["chunk"]) for _, m in media] == list(range(1, len(media) + 1))
    assert all(len(parse_twilio_message_audio(m)) == 160 for _, m in media)
    span = media[-1][0] - media[0][0]
    assert span == pytest.approx((len(media) - 1) * 0.02, rel=0.1, abs=0.03)  # real time

    assert result.marks_echoed == ["greeting", "reply-1"]
    assert result.stop_reason == "script_ended"
    turn, = result.turns
    assert turn.label == "hello.wav" and turn.latency_ms is not None and turn.latency_ms < 300
    assert any("latency" in line for line in lines)

    with wave.open(str(result.wav_path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    caller, agent = frames[:, 0].astype(float), frames[:, 1].astype(float)
    greeting = slice(0, 1600)  # the agent greets at once; the caller waits for it to finish
    assert np.abs(agent[greeting]).mean() > 1000 and np.abs(caller[greeting]).mean() < 10
    spoken = slice(round(turn.started_at * 8000), round(turn.ended_at * 8000))
    assert np.abs(caller[spoken]).mean() > 1000 and np.abs(agent[spoken]).mean() < 10


def parse_twilio_message_audio(message: dict) -> bytes:
    import json

    return parse_twilio_message(json.dumps(message)).audio()


async def test_key_presses_timed_utterances_and_hangup_follow_the_clock(
        gateway: tuple[StandInGateway, str]) -> None:
    stand_in, url = gateway
    stand_in.reply_to_speech = False
    words = Utterance(audio=b"\x10" * 800, label="over", at=1.0)  # 0.1 s, whatever plays
    script = CallScript(utterances=(words,), key_presses=(KeyPress(digit="5", at=0.5),),
                        hangup_after=1.6)
    result = await simulator(url, script, clock=FakeClock()).run()
    await asyncio.wait_for(stand_in.stream_done.wait(), 5)

    assert result.stop_reason == "hangup_after"
    sent = [message for _, message in stand_in.messages]
    media = [m for m in sent if m["event"] == "media"]
    assert len(media) == 80  # 1.6 s of 20 ms frames
    dtmf_index = next(i for i, m in enumerate(sent) if m["event"] == "dtmf")
    assert sent[dtmf_index]["dtmf"] == {"track": "inbound_track", "digit": "5"}
    assert sent[dtmf_index + 1]["media"]["timestamp"] == "500"
    spoken = [m["media"]["timestamp"] for m in media
              if parse_twilio_message_audio(m) != SILENT]
    assert spoken == [str(1000 + 20 * i) for i in range(5)]
    assert sent[-1]["event"] == "stop"
    assert sent[-1]["stop"]["callSid"] == result.call_sid


async def test_a_wrong_auth_token_is_refused_by_the_gateway(
        gateway: tuple[StandInGateway, str]) -> None:
    _, url = gateway
    caller = CallerSimulator(gateway_url=url, public_url=PUBLIC_URL, auth_token="wrong",
                             from_number="+15550100", to_number="+15550199",
                             script=CallScript())
    with pytest.raises(WebhookError, match="403"):
        await caller.run()


async def test_when_the_gateway_closes_the_socket_the_connect_action_is_requested(
        gateway: tuple[StandInGateway, str]) -> None:
    stand_in, url = gateway
    stand_in.close_after_mark = True
    result = await simulator(url, CallScript(hangup_after=5, hang_up_when_done=False)).run()
    assert result.stop_reason == "gateway_closed"
    action, = stand_in.hooks("/twilio/voice/reconnect")
    assert action.signature_valid and action.params["CallSid"] == result.call_sid
    assert stand_in.events()[-1] == "mark"  # no stop on a socket the server closed
