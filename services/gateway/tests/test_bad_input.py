import asyncio
import base64
import binascii
import itertools

import pytest

from parley.common.bus.audio import decode_frame
from parley.gateway.close_codes import CloseCode
from parley.gateway.twilio.media_stream import b64decode

from .conftest import StreamClient, closed, started_stream, wait_for


async def _started(gateway, events):
    stream, call_sid, call_id = await started_stream(gateway, events)
    return stream, call_sid, call_id


async def binary(gateway, events):
    ws = await gateway.ws()
    await ws.send_bytes(b"\x00\x01")
    return await closed(ws)


async def not_json(gateway, events):
    ws = await gateway.ws()
    await ws.send_str("{nope")
    return await closed(ws)


async def event_not_a_string(gateway, events):
    ws = await gateway.ws()
    await ws.send_str('{"event": 5, "sequenceNumber": "1"}')
    return await closed(ws)


async def event_missing(gateway, events):
    ws = await gateway.ws()
    await ws.send_str('{"sequenceNumber": "1", "media": {"payload": ""}}')
    return await closed(ws)


async def invalid_message(gateway, events):
    ws = await gateway.ws()
    await ws.send_str('{"event": "start", "sequenceNumber": "1", "start": {"callSid": 5}}')
    return await closed(ws)


async def invalid_base64(gateway, events):
    stream, _, _ = await _started(gateway, events)
    await stream.send({"event": "media", "sequenceNumber": "9", "streamSid": stream.stream_sid,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "20",
                                 "payload": "not*base64!"}})
    return await stream.closed()


async def _bad_media(gateway, events, *, seq: str = "9", timestamp: str = "20"):
    stream, _, _ = await _started(gateway, events)
    await stream.send({"event": "media", "sequenceNumber": seq, "streamSid": stream.stream_sid,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": timestamp,
                                 "payload": "//8="}})
    return await stream.closed()


async def sequence_number_too_big(gateway, events):  # over the 22 bits a frame's seq has for it
    return await _bad_media(gateway, events, seq=str(2**22))


async def sequence_number_over_64_bits(gateway, events):
    return await _bad_media(gateway, events, seq=str(2**64 - 1))


async def negative_timestamp(gateway, events):
    return await _bad_media(gateway, events, timestamp="-20")


async def timestamp_over_32_bits(gateway, events):
    return await _bad_media(gateway, events, timestamp=str(2**32))


async def out_of_order(gateway, events):
    stream, _, _ = await _started(gateway, events)
    await stream.media(b"\xff" * 160)
    stream.seq -= 2  # Twilio never goes backwards
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def media_before_start(gateway, events):
    stream = StreamClient(await gateway.ws())
    await stream.connected()
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def duplicate_start(gateway, events):
    stream, call_sid, call_id = await _started(gateway, events)
    await stream.start(call_sid, call_id)
    return await stream.closed()


async def unknown_call(gateway, events):
    stream = StreamClient(await gateway.ws())
    await stream.start("CA" + "f" * 32, "call_doesnotexist")
    return await stream.closed()


async def foreign_call_sid(gateway, events):
    _, call_id, _ = await gateway.inbound_call()
    stream = StreamClient(await gateway.ws())
    await stream.start("CA" + "e" * 32, call_id)  # our call id, someone else's CallSid
    return await stream.closed()


async def unknown_stream(gateway, events):
    stream, _, _ = await _started(gateway, events)
    stream.stream_sid = "MZ" + "0" * 32
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def unknown_stream_named_in_another_script(gateway, events):
    # the reason quotes the id; cut at 123 bytes mid-character, it was not UTF-8, and the
    # carrier's side failed the close frame itself (1007) instead of reading 1008 and why
    stream, _, _ = await _started(gateway, events)
    stream.stream_sid = "流" * 40
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def too_big(gateway, events):
    ws = await gateway.ws()
    await ws.send_str('{"event": "connected", "pad": "' + "x" * 70_000 + '"}')
    return await closed(ws)


async def start_timeout(gateway, events):
    ws = await gateway.ws()
    await StreamClient(ws).connected()
    return await closed(ws)


async def ended_call(gateway, events):
    call_sid, call_id, _ = await gateway.inbound_call()
    await gateway.post("/twilio/status", {"CallSid": call_sid, "CallStatus": "completed"})
    stream = StreamClient(await gateway.ws())
    await stream.start(call_sid, call_id)
    return await stream.closed()


CASES = [
    (binary, CloseCode.UNSUPPORTED_DATA, "binary frames are not part of the protocol"),
    (not_json, CloseCode.UNSUPPORTED_DATA, "message is not JSON"),
    (event_not_a_string, CloseCode.INVALID_MESSAGE, "invalid message"),
    (event_missing, CloseCode.INVALID_MESSAGE, "invalid message"),
    (invalid_message, CloseCode.INVALID_MESSAGE, "invalid message"),
    (invalid_base64, CloseCode.INVALID_PAYLOAD, "invalid base64"),
    (sequence_number_too_big, CloseCode.INVALID_MESSAGE, "sequenceNumber"),
    (sequence_number_over_64_bits, CloseCode.INVALID_MESSAGE, "sequenceNumber"),
    (negative_timestamp, CloseCode.INVALID_MESSAGE, "media.timestamp"),
    (timestamp_over_32_bits, CloseCode.INVALID_MESSAGE, "media.timestamp"),
    (out_of_order, CloseCode.OUT_OF_ORDER, "sequenceNumber"),
    (media_before_start, CloseCode.NOT_STARTED, "media before start"),
    (duplicate_start, CloseCode.DUPLICATE_START, "second start on one socket"),
    (unknown_call, CloseCode.POLICY_VIOLATION, "unknown call"),
    (foreign_call_sid, CloseCode.POLICY_VIOLATION, "unknown call"),
    (unknown_stream, CloseCode.POLICY_VIOLATION, "unknown stream"),
    (unknown_stream_named_in_another_script, CloseCode.POLICY_VIOLATION, "unknown stream '流流"),
    (too_big, CloseCode.MESSAGE_TOO_BIG, ""),
    (start_timeout, CloseCode.START_TIMEOUT, "no start within 0.5s"),
    (ended_call, CloseCode.POLICY_VIOLATION, "call already ended"),
]


@pytest.mark.parametrize(("case", "code", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_bad_input_gets_a_precise_close(make_gateway, events, case, code, reason):
    gateway = await make_gateway(stream_start_timeout_s=0.5)
    got_code, got_reason = await case(gateway, events)
    assert got_code == code
    assert reason in got_reason
    await wait_for(lambda: gateway.metric("gateway_socket_closes_total",
                                          protocol="twilio_stream", code=str(int(code))) == 1)


async def test_bad_sockets_do_not_affect_a_concurrent_good_call(make_gateway, events, bus):
    gateway = await make_gateway(stream_start_timeout_s=0.5)
    good, call_sid, call_id = await started_stream(gateway, events)
    received = []

    async def on_in(msg):
        received.append(decode_frame(msg.data)[3])

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)

    async def keep_talking():
        for n in range(50):
            await good.media(bytes([n]) * 160)
            await asyncio.sleep(0.01)

    results = await asyncio.gather(keep_talking(),
                                   *(case(gateway, events) for case, _, _ in CASES))
    assert [code for code, _ in results[1:]] == [code for _, code, _ in CASES]
    await wait_for(lambda: len(received) == 50)
    assert received == [bytes([n]) * 160 for n in range(50)]
    await sub.unsubscribe()
    await good.stop(call_sid)
    assert await good.closed() == (1000, "stream stopped")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_message_of_an_event_we_do_not_know_is_ignored_and_the_call_goes_on(
        make_gateway, events, bus, caplog):
    """Twilio adds events to Media Streams (dtmf came after launch); the socket closed on the
    first one it did not know (4401), so one such addition would have hung up every live call
    at once. A well-formed message of an unknown event is now ignored, before start as after:
    counted by event (the label cut to a bounded name), logged once per socket, and the
    caller's audio after it still reaches NATS."""
    gateway = await make_gateway()
    call_sid, call_id, _ = await gateway.inbound_call()
    received = []

    async def on_in(msg):
        received.append(decode_frame(msg.data)[3])

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    stream = StreamClient(await gateway.ws())
    await stream.connected()
    await stream.send({"event": "transcription", "sequenceNumber": "1"})  # before start
    stream.seq = 1
    await stream.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id)
    await stream.media(b"\x01" * 160)
    await stream.send({"event": "transcription", "sequenceNumber": str(stream.seq + 1),
                       "streamSid": stream.stream_sid, "transcription": {"text": "hi"}})
    stream.seq += 1
    await stream.send({"event": "Teleport-" + "x" * 200 + "\n", "anything": [1, 2]})
    await stream.media(b"\x02" * 160)
    await wait_for(lambda: len(received) == 2)
    assert received == [b"\x01" * 160, b"\x02" * 160]
    assert gateway.metric("gateway_unknown_messages_total", protocol="twilio_stream",
                          event="transcription") == 2
    assert gateway.metric("gateway_unknown_messages_total", protocol="twilio_stream",
                          event="Teleport_" + "x" * 23) == 1
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "unknown event" in r.getMessage()]
    assert len(warnings) == 1 and "'transcription'" in warnings[0]
    await sub.unsubscribe()
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


def test_media_payloads_are_decoded_and_refused_as_b64decode_validate_does():
    """Every string of up to 6 characters from base64's alphabet, padding and what is not."""

    def outcome(decode, payload):
        try:
            return decode(payload)
        except (binascii.Error, ValueError) as exc:
            return type(exc)

    for length in range(7):
        for chars in itertools.product("AB+/=a\n é", repeat=length):
            payload = "".join(chars)
            assert outcome(b64decode, payload) == outcome(
                lambda p: base64.b64decode(p, validate=True), payload), payload
