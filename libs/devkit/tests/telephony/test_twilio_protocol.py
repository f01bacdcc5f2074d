import base64
import json

import pytest
from twilio.request_validator import RequestValidator

from parley.devkit.telephony import twilio_protocol as tp

STREAM, ACCOUNT, CALL = "MZ" + "a" * 32, "AC" + "b" * 32, "CA" + "c" * 32


def test_messages_are_shaped_and_numbered_as_twilio_sends_them() -> None:
    messages = tp.StreamMessages(stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL)
    sent = [json.loads(tp.encode(message)) for message in (
        messages.connected(), messages.start({"call_id": "c1"}),
        messages.media(b"\xff\x7f", 0), messages.media(b"\x00", 20), messages.mark("m1"),
        messages.dtmf("7"), messages.stop())]
    assert sent == [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {"event": "start", "sequenceNumber": "1",
         "start": {"accountSid": ACCOUNT, "streamSid": STREAM, "callSid": CALL,
                   "tracks": ["inbound"], "customParameters": {"call_id": "c1"},
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                   "channels": 1}},
         "streamSid": STREAM},
        {"event": "media", "sequenceNumber": "2",
         "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "/38="},
         "streamSid": STREAM},
        {"event": "media", "sequenceNumber": "3",
         "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": "AA=="},
         "streamSid": STREAM},
        {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": "m1"}},
        {"event": "dtmf", "streamSid": STREAM, "sequenceNumber": "5",
         "dtmf": {"track": "inbound_track", "digit": "7"}},
        {"event": "stop", "sequenceNumber": "6", "streamSid": STREAM,
         "stop": {"accountSid": ACCOUNT, "callSid": CALL}},
    ]


def test_media_text_is_the_encoded_media_message_and_numbers_alike() -> None:
    built = tp.StreamMessages(stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL)
    texts = tp.StreamMessages(stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL)
    for messages in (built, texts):
        messages.start({"call_id": "c1"})
    for audio, at in ((b"\xff\x7f", 0), (b"\x00" * 160, 20), (bytes(range(160)), 40)):
        expected = tp.encode(built.media(audio, at)).encode()
        assert texts.media_text(base64.b64encode(audio), at) == expected
        assert texts.sequence == built.sequence
    assert tp.encode(texts.mark("m1")) == tp.encode(built.mark("m1"))


def test_twilio_messages_parse_back() -> None:
    messages = tp.StreamMessages(stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL)
    media = tp.parse_twilio_message(tp.encode(messages.media(b"abc", 40)))
    assert isinstance(media, tp.Media) and media.audio() == b"abc"
    assert media.media.timestamp == "40"
    start = tp.parse_twilio_message(tp.encode(messages.start({"a": "b"})))
    assert isinstance(start, tp.Start) and start.start.custom_parameters == {"a": "b"}
    with pytest.raises(tp.ProtocolError):
        tp.parse_twilio_message('{"event": "start"}')


def test_server_messages_match_what_a_gateway_sends() -> None:
    payload = base64.b64encode(b"\x01\x02").decode()
    assert json.loads(tp.encode(tp.server_media(STREAM, b"\x01\x02"))) == {
        "event": "media", "streamSid": STREAM, "media": {"payload": payload}}
    assert json.loads(tp.encode(tp.server_mark(STREAM, "x"))) == {
        "event": "mark", "streamSid": STREAM, "mark": {"name": "x"}}
    assert json.loads(tp.encode(tp.clear(STREAM))) == {"event": "clear", "streamSid": STREAM}

    parsed = tp.parse_server_message(json.dumps(
        {"event": "media", "streamSid": STREAM, "media": {"payload": payload}}))
    assert isinstance(parsed, tp.ServerMedia) and parsed.audio() == b"\x01\x02"
    for bad in ('{"event": "media", "streamSid": "MZ", "media": {"payload": "%%"}}',
                '{"event": "dance", "streamSid": "MZ"}', '{"event": "clear"}', "not json"):
        with pytest.raises(tp.ProtocolError):
            tp.parse_server_message(bad)


def test_a_signed_webhook_validates_and_any_one_character_change_fails() -> None:
    token, url = "12345678901234567890123456789012", "https://voice.example.com/twilio/voice?x=1"
    params = {"CallSid": CALL, "From": "+15550100", "To": "+15550199", "CallStatus": "ringing"}
    signature = tp.compute_signature(token, url, params)
    validator = RequestValidator(token)
    assert validator.validate(url, params, signature)
    assert not validator.validate(url.replace("voice?", "voicf?"), params, signature)
    assert not validator.validate(url, {**params, "From": "+15550101"}, signature)
    assert not validator.validate(url, params, signature[:-2] + ("A" if signature[-2] != "A"
                                                                  else "B") + signature[-1])
    assert not RequestValidator(token[:-1] + "x").validate(url, params, signature)


def test_a_websocket_upgrade_is_signed_over_the_wss_url_without_parameters() -> None:
    token, url = "secret", "wss://voice.example.com/twilio/stream"
    signature = tp.websocket_signature(token, url)
    assert RequestValidator(token).validate(url, {}, signature)
    assert not RequestValidator(token).validate(url + "x", {}, signature)


def test_sids_look_like_twilios() -> None:
    sid = tp.new_sid("CA")
    assert len(sid) == 34 and sid.startswith("CA") and int(sid[2:], 16) >= 0
