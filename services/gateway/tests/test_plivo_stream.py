import asyncio
import base64

import msgspec
import pytest
from aiohttp import WSServerHandshakeError

from parley.common.bus import command_subject, publish_frame
from parley.common.bus.audio import carrier_sequence, decode_frame
from parley.gateway.close_codes import CloseCode
from parley.gateway.marks import mark_name

from . import test_plivo_support as support
from .conftest import CASCADING_AGENT, PUBLIC, closed, live_calls, wait_for
from .test_plivo_support import (
    PlivoStreamClient,
    https_form,
    new_call_uuid,
    signed_headers,
    started_plivo_stream,
)

# the shared Plivo fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_gateway = support.plivo_gateway
plivo_number = support.plivo_number


async def request(bus, call_id: str, verb: str, body: dict | None = None) -> dict:
    reply = await bus.nc.request(command_subject(call_id, verb),
                                 msgspec.json.encode(body or {}), timeout=5)
    return msgspec.json.decode(reply.data)


async def test_full_plivo_stream_session(plivo_gateway, events, bus):
    call_uuid, call_id, root = await plivo_gateway.answer()
    # the socket is opened at the URL the XML named, signed over its https:// form
    stream_url = root.find("Stream").text
    path = stream_url.removeprefix("wss://voice.example.com")
    ws = await plivo_gateway.gateway.client.ws_connect(
        path, headers=signed_headers("GET", https_form(stream_url)))
    stream = PlivoStreamClient(ws)
    await stream.start(call_uuid)
    [started] = await events.wait("call.stream_started", call_id)
    assert (started.stream_id, started.agent_id) == (stream.stream_id, CASCADING_AGENT)
    assert (started.encoding, started.sample_rate, started.gateway_instance) == (
        "mulaw", 8000, "gw-test")
    assert call_id in live_calls(plivo_gateway)

    # caller audio → parley.audio.<call>.in: raw bytes, Plivo's sequence number, audio ms
    inbound: list[tuple[bytes, int, int]] = []

    async def on_in(msg):
        seq, timestamp_ms, _, audio = decode_frame(msg.data)
        inbound.append((audio, seq, timestamp_ms))

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    frames = [bytes([n]) * 160 for n in range(1, 5)]
    sequence_numbers = [await stream.media(frame) for frame in frames]
    await wait_for(lambda: len(inbound) == 4)
    await sub.unsubscribe()
    assert [data for data, _, _ in inbound] == frames
    assert [carrier_sequence(seq) for _, seq, _ in inbound] == sequence_numbers
    assert [timestamp_ms for _, _, timestamp_ms in inbound] == [0, 20, 40, 60]

    await stream.dtmf("5")
    [dtmf] = await events.wait("call.dtmf", call_id)
    assert dtmf.digit == "5"

    # agent audio → playAudio, and a checkpoint after the frame that carries a mark
    await publish_frame(bus.nc, call_id, "out", b"\x7f" * 160, seq=1, timestamp_ms=0)
    await publish_frame(bus.nc, call_id, "out", b"\x80" * 160, seq=2, timestamp_ms=20,
                        mark=mark_name("turn_1", 2))
    first, second, checkpoint = [await stream.receive_json() for _ in range(3)]
    assert first == {"event": "playAudio", "media": {
        "contentType": "audio/x-mulaw", "sampleRate": 8000,
        "payload": base64.b64encode(b"\x7f" * 160).decode()}}
    assert base64.b64decode(second["media"]["payload"]) == b"\x80" * 160
    assert checkpoint == {"event": "checkpoint", "streamId": stream.stream_id,
                          "name": "turn_1:2"}

    # the checkpoint's echo → agent.speech.progress
    await stream.played("turn_1:2")
    [progress] = await events.wait("agent.speech.progress", call_id)
    assert (progress.turn_id, progress.seq, progress.mark) == ("turn_1", 2, "turn_1:2")

    # commands: clear → clearAudio (acknowledged by clearedAudio), mark → checkpoint
    assert await request(bus, call_id, "clear") == {"ok": True}
    assert await stream.receive_json() == {"event": "clearAudio", "streamId": stream.stream_id}
    await stream.cleared()
    assert await request(bus, call_id, "mark", {"name": "turn_2:0"}) == {"ok": True}
    assert (await stream.receive_json())["name"] == "turn_2:0"

    # hang-up command: call.ended once, then Plivo's REST API (the stand-in) ends the call
    assert await request(bus, call_id, "hangup") == {"ok": True}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "agent_hangup"
    assert plivo_gateway.api.hung_up == [call_uuid]
    await plivo_gateway.post("/plivo/hangup", {"CallUUID": call_uuid, "CallStatus": "completed",
                                               "Duration": "3", "HangupSource": "API Request"})
    assert len(events.of("call.ended", call_id)) == 1
    await ws.close()
    await wait_for(lambda: call_id not in live_calls(plivo_gateway))


async def test_a_checkpoint_named_with_thousands_of_digits_is_reported_whole(plivo_gateway,
                                                                              events):
    # int() refuses a string of over 4300 digits: the socket closed 1011
    stream, _, call_id = await started_plivo_stream(plivo_gateway, events)
    name = "turn_1:" + "9" * 5000
    await stream.played(name)
    [progress] = await events.wait("agent.speech.progress", call_id)
    assert (progress.turn_id, progress.seq) == (name, 0)
    await stream.media(b"\xff" * 160)
    await stream.ws.close()
    assert plivo_gateway.metric("gateway_socket_closes_total", protocol="plivo_stream",
                                code="1011") == 0


async def test_a_checkpoint_name_with_a_nul_is_reported_without_it(plivo_gateway, events):
    # Postgres cannot store a NUL: the event store's recorder would refuse the progress event
    stream, _, call_id = await started_plivo_stream(plivo_gateway, events)
    await stream.played("turn_1\x00:3")
    [progress] = await events.wait("agent.speech.progress", call_id)
    assert (progress.mark, progress.turn_id, progress.seq) == ("turn_1:3", "turn_1", 3)


async def test_clear_and_mark_say_so_when_the_socket_is_gone(plivo_gateway, events, bus):
    # They replied ok though nothing was sent, and media waited for a checkpoint echo that
    # never came. The session closes the socket on a message it refuses, and until Plivo
    # answers the close (here: not yet) the call's commands are served.
    stream, _, call_id = await started_plivo_stream(plivo_gateway, events)
    await stream.dtmf("hello!")
    await wait_for(lambda: plivo_gateway.metric("gateway_socket_closes_total",
                                                protocol="plivo_stream", code="4400"))
    for verb, body in (("clear", {}), ("mark", {"name": "turn_1:4"})):
        assert await request(bus, call_id, verb, body) == {
            "ok": False, "error": f"{verb} not sent: the call's socket is closed"}
    assert (await stream.closed())[0] == CloseCode.INVALID_MESSAGE


async def test_dtmf_and_transfer_commands_use_the_rest_api(plivo_gateway, events, bus):
    stream, call_uuid, call_id = await started_plivo_stream(plivo_gateway, events)
    assert await request(bus, call_id, "dtmf", {"digits": "12#"}) == {"ok": True}
    [(uuid, body)] = plivo_gateway.api.digits
    assert (uuid, body["digits"], body["leg"]) == (call_uuid, "12#", "aleg")
    assert await request(bus, call_id, "transfer", {"to": "+14155550123"}) == {"ok": True}
    [(uuid, body)] = plivo_gateway.api.transferred
    assert uuid == call_uuid and body["legs"] == "aleg"
    assert body["aleg_url"] == (f"{PUBLIC}/plivo/transfer?call_id={call_id}"
                                "&to=%2B14155550123")
    [transferred] = await events.wait("call.transferred", call_id)
    assert transferred.to_number == "+14155550123"
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"
    assert (await request(bus, call_id, "transfer", {"to": "+14155550123"}))["ok"] is False
    await stream.ws.close()


async def test_a_transfer_plivo_fails_leaves_the_call_live(plivo_gateway, events, bus):
    stream, call_uuid, call_id = await started_plivo_stream(plivo_gateway, events)
    plivo_gateway.api.fail_transfers_with = 500
    assert (await request(bus, call_id, "transfer", {"to": "+14155550123"}))["ok"] is False
    await asyncio.sleep(0.2)
    assert not events.of("call.transferred", call_id) and not events.of("call.ended", call_id)
    assert not stream.ws.closed
    plivo_gateway.api.fail_transfers_with = None
    assert await request(bus, call_id, "transfer", {"to": "+14155550123"}) == {"ok": True}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"
    assert len(events.of("call.transferred", call_id)) == 1
    await stream.ws.close()


async def test_hangup_without_rest_closes_the_socket(make_plivo_gateway, events, bus):
    gateway = await make_plivo_gateway(plivo_auth_id="")
    stream, call_uuid, call_id = await started_plivo_stream(gateway, events)
    assert (await request(bus, call_id, "dtmf", {"digits": "1"}))["ok"] is False
    assert await request(bus, call_id, "hangup") == {"ok": True}
    assert await stream.closed() == (1000, "agent_hangup")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "agent_hangup"
    # Plivo then follows the <Redirect>: the call has ended, so it hangs up
    _, _, root = await gateway.answer(call_uuid=call_uuid,
                                      path=f"/plivo/answer?call_id={call_id}&reconnect=1")
    assert [child.tag for child in root] == ["Hangup"]


async def test_upgrade_with_a_bad_signature_is_refused(plivo_gateway, events):
    _, call_id, _ = await plivo_gateway.answer()
    headers = signed_headers("GET", f"{PUBLIC}/plivo/stream?call_id={call_id}")
    signature = headers["X-Plivo-Signature-V3"]
    # One character changed (a signature that happens to start with "x" must still change).
    headers["X-Plivo-Signature-V3"] = ("y" if signature[0] == "x" else "x") + signature[1:]
    with pytest.raises(WSServerHandshakeError) as refused:
        await plivo_gateway.ws(call_id, headers=headers)
    assert refused.value.status == 403
    [rejected] = await events.wait("security.signature_rejected")
    assert (rejected.carrier, rejected.path) == ("plivo", "/plivo/stream")


# -- bad input: a precise close code and reason, counted, never affecting another call ------

async def _socket(gateway, events):
    _, call_id, _ = await gateway.answer()
    return PlivoStreamClient(await gateway.ws(call_id))


async def binary(gateway, events):
    stream = await _socket(gateway, events)
    await stream.ws.send_bytes(b"\x00\x01")
    return await stream.closed()


async def not_json(gateway, events):
    stream = await _socket(gateway, events)
    await stream.ws.send_str("{nope")
    return await stream.closed()


async def event_not_a_string(gateway, events):
    stream = await _socket(gateway, events)
    await stream.send({"event": ["start"], "sequenceNumber": 1})
    return await stream.closed()


async def invalid_message(gateway, events):
    stream = await _socket(gateway, events)
    await stream.send({"event": "start", "sequenceNumber": 1, "start": {"callId": 5}})
    return await stream.closed()


async def unsupported_format(gateway, events):
    call_uuid, call_id, _ = await gateway.answer()
    stream = PlivoStreamClient(await gateway.ws(call_id))
    await stream.start(call_uuid, encoding="audio/x-l16", sample_rate=16000)
    return await stream.closed()


async def invalid_base64(gateway, events):
    stream, _, _ = await started_plivo_stream(gateway, events)
    await stream.media(b"", payload="not*base64!")
    return await stream.closed()


async def sequence_number_too_big(gateway, events):  # over the 22 bits a frame's seq has for it
    stream, _, _ = await started_plivo_stream(gateway, events)
    stream.seq = 2**22 - 1
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def out_of_order(gateway, events):
    stream, _, _ = await started_plivo_stream(gateway, events)
    await stream.media(b"\xff" * 160)
    stream.seq -= 2
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def media_before_start(gateway, events):
    stream = await _socket(gateway, events)
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def duplicate_start(gateway, events):
    stream, call_uuid, _ = await started_plivo_stream(gateway, events)
    await stream.start(call_uuid)
    return await stream.closed()


async def foreign_call_uuid(gateway, events):
    stream = await _socket(gateway, events)
    await stream.start(new_call_uuid())  # our call id in the URL, someone else's CallUUID
    return await stream.closed()


async def unknown_call(gateway, events):
    stream = PlivoStreamClient(await gateway.ws("call_doesnotexist"))
    await stream.start(new_call_uuid())
    return await stream.closed()


async def unknown_stream(gateway, events):
    stream, _, _ = await started_plivo_stream(gateway, events)
    stream.stream_id = new_call_uuid()
    await stream.media(b"\xff" * 160)
    return await stream.closed()


async def nul_in_stream_id(gateway, events):  # stored as the stream's milestone: 1011
    call_uuid, call_id, _ = await gateway.answer()
    stream = PlivoStreamClient(await gateway.ws(call_id), stream_id="stream\x00one")
    await stream.start(call_uuid)
    return await stream.closed()


async def invalid_dtmf(gateway, events):  # published as a key, it became the caller's "turn"
    stream, _, _ = await started_plivo_stream(gateway, events)
    await stream.dtmf("hello!")
    return await stream.closed()


async def too_big(gateway, events):
    stream = await _socket(gateway, events)
    await stream.ws.send_str('{"event": "media", "pad": "' + "x" * 70_000 + '"}')
    return await stream.closed()


async def start_timeout(gateway, events):
    return await closed((await _socket(gateway, events)).ws)


async def ended_call(gateway, events):
    call_uuid, call_id, _ = await gateway.answer()
    await gateway.post("/plivo/hangup", {"CallUUID": call_uuid, "CallStatus": "completed"})
    stream = PlivoStreamClient(await gateway.ws(call_id))
    await stream.start(call_uuid)
    return await stream.closed()


CASES = [
    (binary, CloseCode.UNSUPPORTED_DATA, "binary frames are not part of the protocol"),
    (not_json, CloseCode.UNSUPPORTED_DATA, "message is not JSON"),
    (event_not_a_string, CloseCode.INVALID_MESSAGE, "invalid message"),
    (invalid_message, CloseCode.INVALID_MESSAGE, "invalid message"),
    (unsupported_format, CloseCode.INVALID_MESSAGE, "unsupported media format"),
    (invalid_base64, CloseCode.INVALID_PAYLOAD, "invalid base64"),
    (sequence_number_too_big, CloseCode.INVALID_MESSAGE, "sequenceNumber"),
    (out_of_order, CloseCode.OUT_OF_ORDER, "sequenceNumber"),
    (media_before_start, CloseCode.NOT_STARTED, "media before start"),
    (duplicate_start, CloseCode.DUPLICATE_START, "second start on one socket"),
    (foreign_call_uuid, CloseCode.POLICY_VIOLATION, "unknown call"),
    (unknown_call, CloseCode.POLICY_VIOLATION, "unknown call"),
    (unknown_stream, CloseCode.POLICY_VIOLATION, "unknown stream"),
    (invalid_dtmf, CloseCode.INVALID_MESSAGE, "invalid dtmf digit 'hello!'"),
    (nul_in_stream_id, CloseCode.INVALID_MESSAGE, "start without a valid streamId"),
    (too_big, CloseCode.MESSAGE_TOO_BIG, ""),
    (start_timeout, CloseCode.START_TIMEOUT, "no start within 0.5s"),
    (ended_call, CloseCode.POLICY_VIOLATION, "call already ended"),
]


@pytest.mark.parametrize(("case", "code", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_bad_input_gets_a_precise_close(make_plivo_gateway, events, case, code, reason):
    gateway = await make_plivo_gateway(stream_start_timeout_s=0.5)
    got_code, got_reason = await case(gateway, events)
    assert got_code == code
    assert reason in got_reason
    await wait_for(lambda: gateway.metric("gateway_socket_closes_total",
                                          protocol="plivo_stream", code=str(int(code))) == 1)


async def test_bad_sockets_do_not_affect_a_concurrent_good_call(make_plivo_gateway, events,
                                                                bus):
    gateway = await make_plivo_gateway(stream_start_timeout_s=0.5)
    good, _, call_id = await started_plivo_stream(gateway, events)
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
    await good.ws.close()


async def test_a_message_of_an_event_we_do_not_know_is_ignored_and_the_call_goes_on(
        make_plivo_gateway, events, bus, caplog):
    """Plivo's protocol page lists start, media, dtmf, playedStream and clearedAudio, but its
    own code also reads a ``stop`` (and more) off the socket; the socket closed on the first
    event it did not know (4401), hanging up the call. A well-formed message of an unknown
    event is now ignored: counted by event, logged once per socket, and the caller's audio
    after it still reaches NATS (the call's end comes from Plivo's hangup callback)."""
    gateway = await make_plivo_gateway()
    stream, _, call_id = await started_plivo_stream(gateway, events)
    received = []

    async def on_in(msg):
        received.append(decode_frame(msg.data)[3])

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    await stream.media(b"\x01" * 160)
    await stream.send({"event": "stop", "sequenceNumber": stream.seq + 1,
                       "streamId": stream.stream_id, "stop": {"reason": "whatever"}})
    stream.seq += 1
    await stream.send({"event": "muteStream", "streamId": "someone else's"})
    await stream.media(b"\x02" * 160)
    await wait_for(lambda: len(received) == 2)
    assert received == [b"\x01" * 160, b"\x02" * 160]
    for event in ("stop", "muteStream"):
        assert gateway.metric("gateway_unknown_messages_total", protocol="plivo_stream",
                              event=event) == 1
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "unknown event" in r.getMessage()]
    assert len(warnings) == 1 and "'stop'" in warnings[0]
    assert not stream.ws.closed
    await sub.unsubscribe()
    await stream.ws.close()
