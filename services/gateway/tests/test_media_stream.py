import asyncio
import base64
import xml.etree.ElementTree as ElementTree
from datetime import timedelta

import msgspec

from parley.common.bus import EVENTS_STREAM, command_subject, publish_frame
from parley.common.bus.audio import carrier_sequence, decode_frame
from parley.common.events import utcnow
from parley.gateway.marks import mark_name

from .conftest import (
    CASCADING_AGENT,
    StreamClient,
    live_calls,
    reconnect_path,
    started_stream,
    wait_for,
)


async def request(bus, call_id: str, verb: str, body: dict | None = None, *,
                  timeout: float = 5) -> dict:
    reply = await bus.nc.request(command_subject(call_id, verb),
                                 msgspec.json.encode(body or {}), timeout=timeout)
    return msgspec.json.decode(reply.data)


async def test_full_media_stream_session(gateway, events, bus):
    stream, call_sid, call_id = await started_stream(gateway, events)
    [started] = events.of("call.stream_started", call_id)
    assert started.stream_id == stream.stream_sid and started.gateway_instance == "gw-test"
    assert started.agent_id == CASCADING_AGENT and started.pipeline == "cascading"
    assert call_id in live_calls(gateway)

    # caller audio → parley.audio.<call>.in, raw bytes with Twilio's seq and timestamp
    inbound: list[tuple[bytes, int, int]] = []

    async def on_in(msg):
        seq, timestamp_ms, _, audio = decode_frame(msg.data)
        inbound.append((audio, seq, timestamp_ms))

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    frames = [bytes([n]) * 160 for n in range(1, 6)]
    sequence_numbers = [await stream.media(frame) for frame in frames]
    await wait_for(lambda: len(inbound) == 5)
    await sub.unsubscribe()
    assert [data for data, _, _ in inbound] == frames
    assert [carrier_sequence(seq) for _, seq, _ in inbound] == sequence_numbers
    assert [timestamp_ms for _, _, timestamp_ms in inbound] == [20, 40, 60, 80, 100]

    # agent audio → media messages, and a mark after the frame that carries one
    await publish_frame(bus.nc, call_id, "out", b"\x7f" * 160, seq=1, timestamp_ms=0)
    await publish_frame(bus.nc, call_id, "out", b"\x80" * 160, seq=2, timestamp_ms=20,
                        mark=mark_name("turn_1", 2))
    first, second, mark = [await stream.receive_json() for _ in range(3)]
    assert first == {"event": "media", "streamSid": stream.stream_sid,
                     "media": {"payload": base64.b64encode(b"\x7f" * 160).decode()}}
    assert base64.b64decode(second["media"]["payload"]) == b"\x80" * 160
    assert mark == {"event": "mark", "streamSid": stream.stream_sid,
                    "mark": {"name": "turn_1:2"}}

    # the mark's echo → agent.speech.progress
    await stream.mark("turn_1:2")
    [progress] = await events.wait("agent.speech.progress", call_id)
    assert (progress.turn_id, progress.seq, progress.mark) == ("turn_1", 2, "turn_1:2")

    await stream.dtmf("7")
    [dtmf] = await events.wait("call.dtmf", call_id)
    assert dtmf.digit == "7"

    # commands: clear and mark
    assert await request(bus, call_id, "clear") == {"ok": True}
    assert await stream.receive_json() == {"event": "clear", "streamSid": stream.stream_sid}
    assert await request(bus, call_id, "mark", {"name": "turn_2:0"}) == {"ok": True}
    assert (await stream.receive_json())["mark"] == {"name": "turn_2:0"}
    assert (await request(bus, call_id, "mark"))["ok"] is False

    # stop → call.ended once, even with the status callback after it
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"
    await gateway.post("/twilio/status", {"CallSid": call_sid, "CallStatus": "completed",
                                          "CallDuration": "3"})
    await asyncio.sleep(0.2)
    assert len(events.of("call.ended", call_id)) == 1
    await wait_for(lambda: call_id not in live_calls(gateway))


async def test_agent_audio_goes_out_as_the_encoder_writes_the_media_message(gateway, events, bus):
    """The wire text of an outbound media message and its mark, byte for byte.

    The gateway writes a media message's text around the base64 payload without the JSON
    encoder (its every outbound frame); it must stay exactly what the encoder makes of the
    message, compact, keys in Twilio's order, so any JSON reader (Twilio's) reads it the same.
    """
    stream, _, call_id = await started_stream(gateway, events)
    audio = bytes(range(256)) * 6 + b"\xff" * 64  # 200 ms: what media sends together
    await publish_frame(bus.nc, call_id, "out", audio, seq=1, timestamp_ms=0,
                        mark=mark_name("turn_1", 10))
    await publish_frame(bus.nc, call_id, "out", b"\x7f" * 160, seq=11, timestamp_ms=200)
    texts = [(await stream.ws.receive(timeout=5)).data for _ in range(3)]
    encode = msgspec.json.encode
    assert texts == [
        encode({"event": "media", "streamSid": stream.stream_sid,
                "media": {"payload": base64.b64encode(audio).decode()}}).decode(),
        encode({"event": "mark", "streamSid": stream.stream_sid,
                "mark": {"name": "turn_1:10"}}).decode(),
        encode({"event": "media", "streamSid": stream.stream_sid,
                "media": {"payload": base64.b64encode(b"\x7f" * 160).decode()}}).decode()]


async def test_a_foreign_mark_ending_in_other_digits_is_reported_whole(gateway, events, bus):
    # str.isdigit() takes "²" for a digit and int() then refused it: the socket closed 1011
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.mark("chapter:²")
    [progress] = await events.wait("agent.speech.progress", call_id)
    assert (progress.turn_id, progress.seq, progress.mark) == ("chapter:²", 0, "chapter:²")
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")


async def test_clear_and_mark_say_so_when_the_socket_is_gone(gateway, events, bus):
    # They replied ok though nothing was sent, and media waited for a mark echo that never
    # came. The caller hangs up: on the stream's stop the session ends the call and closes the
    # socket, and until Twilio answers the close (here: not yet) the call's commands are served.
    stream, call_sid, call_id = await started_stream(gateway, events)
    await stream.stop(call_sid)
    await events.wait("call.ended", call_id)
    await asyncio.sleep(0.1)
    for verb, body in (("clear", {}), ("mark", {"name": "turn_1:4"})):
        assert await request(bus, call_id, verb, body) == {
            "ok": False, "error": f"{verb} not sent: the call's socket is closed"}
    assert await stream.closed() == (1000, "stream stopped")


async def test_hangup_command_without_rest_closes_the_socket(gateway, events, bus):
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert await request(bus, call_id, "hangup") == {"ok": True}
    assert await stream.closed() == (1000, "agent_hangup")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "agent_hangup"
    # Twilio then asks the action URL, which hangs up the ended call
    response = await gateway.post(reconnect_path(call_id),
                                  {"CallSid": call_sid})
    assert ElementTree.fromstring(await response.text())[0].tag == "Hangup"


async def test_an_idle_hangup_ends_the_call_with_reason_idle(gateway, events, bus):
    # The tools service's end_call for a caller silent for the agent's idle_hangup_s.
    stream, _, call_id = await started_stream(gateway, events)
    assert await request(bus, call_id, "hangup", {"reason": "idle"}) == {"ok": True}
    assert await stream.closed() == (1000, "idle")
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "idle"


async def test_hangup_and_transfer_use_the_rest_api(make_gateway, events, bus):
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert await request(bus, call_id, "transfer", {"to": "+14155550123"}) == {"ok": True}
    [transferred] = await events.wait("call.transferred", call_id)
    assert transferred.to_number == "+14155550123" and transferred.mode == "cold"
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"
    [(sid, form)] = gateway.rest_fake.updates
    assert sid == call_sid
    dial = ElementTree.fromstring(form["Twiml"]).find("Dial")
    assert dial.text == "+14155550123"
    # a second end is refused, and the stop that follows emits nothing
    assert (await request(bus, call_id, "transfer", {"to": "+14155550124"}))["ok"] is False
    for bad in ("555", "+1415\uff15550123"):  # ..., and a full-width digit in it
        assert (await request(bus, call_id, "transfer", {"to": bad}))["error"].startswith(
            "transfer needs an E.164")
    await stream.stop(call_sid)
    await stream.closed()
    assert len(events.of("call.ended", call_id)) == 1

    stream, call_sid, call_id = await started_stream(gateway, events)
    # an inbound call of an agent that records is recorded from the stream's start, once
    await wait_for(lambda: len(gateway.rest_fake.recordings) == 2)
    sid, form = gateway.rest_fake.recordings[-1]
    assert sid == call_sid and form["RecordingChannels"] == "dual"
    assert form["RecordingStatusCallback"].startswith(
        f"https://voice.example.com/twilio/recording?call_id={call_id}&")
    assert await request(bus, call_id, "hangup", {"reason": "agent_hangup"}) == {"ok": True}
    await wait_for(lambda: len(gateway.rest_fake.updates) == 2)
    assert gateway.rest_fake.updates[-1] == (call_sid, {"Status": "completed"})
    await events.wait("call.ended", call_id)


async def test_a_warm_transfer_is_refused_not_done_cold(make_gateway, events, bus):
    # No warm transfer exists: one asked for was done cold, and call.transferred said "warm"
    gateway = await make_gateway(rest=True)
    stream, _, call_id = await started_stream(gateway, events)
    reply = await request(bus, call_id, "transfer", {"to": "+14155550123", "mode": "warm"})
    assert reply == {"ok": False, "error": "warm transfer is not supported; transfer cold"}
    await asyncio.sleep(0.2)
    assert gateway.rest_fake.updates == [] and not events.of("call.transferred", call_id)
    assert not stream.ws.closed


async def test_a_transfer_twilio_fails_leaves_the_call_live(make_gateway, events, bus):
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    gateway.rest_fake.fail_updates_with = 500
    reply = await request(bus, call_id, "transfer", {"to": "+14155550123"})
    assert reply["ok"] is False and "500" in reply["error"]
    # the caller is still with the agent: nothing says otherwise, and the command can be retried
    await asyncio.sleep(0.2)
    assert not events.of("call.transferred", call_id) and not events.of("call.ended", call_id)
    assert not stream.ws.closed
    gateway.rest_fake.fail_updates_with = None
    assert await request(bus, call_id, "transfer", {"to": "+14155550123"}) == {"ok": True}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"
    assert len(events.of("call.transferred", call_id)) == 1
    # the stop that follows the redirect is not the caller hanging up
    await stream.stop(call_sid)
    await stream.closed()
    await asyncio.sleep(0.1)
    assert len(events.of("call.ended", call_id)) == 1


async def test_a_transfer_ends_the_call_even_if_the_stream_stops_before_twilio_answers(
        make_gateway, events, bus):
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    gateway.rest_fake.hold_updates = asyncio.Event()
    transfer = asyncio.create_task(request(bus, call_id, "transfer", {"to": "+14155550123"}))
    await wait_for(lambda: gateway.rest_fake.updates)
    # Twilio has applied the new TwiML and stops the stream before its REST answer arrives
    await stream.stop(call_sid)
    await stream.closed()
    await asyncio.sleep(0.1)
    gateway.rest_fake.hold_updates.set()
    assert await transfer == {"ok": True}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"
    assert len(events.of("call.transferred", call_id)) == 1


async def test_a_barge_in_does_not_wait_behind_a_transfer_twilio_is_slow_to_accept(
        make_gateway, events, bus):
    # A call's commands ran one at a time: while the transfer's redirect waited on Twilio's
    # REST API (up to 10 s), media's clear for the caller's barge-in waited behind it, and
    # the caller went on hearing the agent. A hang-up asked meanwhile still waits its turn.
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    gateway.rest_fake.hold_updates = asyncio.Event()
    transfer = asyncio.create_task(request(bus, call_id, "transfer", {"to": "+14155550123"}))
    await wait_for(lambda: gateway.rest_fake.updates)
    hangup = asyncio.create_task(request(bus, call_id, "hangup"))
    await asyncio.sleep(0.1)  # (the hang-up has arrived)
    assert await request(bus, call_id, "clear", timeout=1) == {"ok": True}
    assert await stream.receive_json() == {"event": "clear", "streamSid": stream.stream_sid}
    assert await request(bus, call_id, "mark", {"name": "turn_2:0"}, timeout=1) == {"ok": True}
    assert (await stream.receive_json())["mark"] == {"name": "turn_2:0"}
    assert len(gateway.rest_fake.updates) == 1  # the hang-up waits for the transfer
    gateway.rest_fake.hold_updates.set()
    assert await transfer == {"ok": True}
    assert await hangup == {"ok": True}
    assert [form for _, form in gateway.rest_fake.updates][1] == {"Status": "completed"}
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "transferred"


async def test_dtmf_redirects_and_the_call_continues_on_a_new_stream(make_gateway, events, bus):
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert await request(bus, call_id, "dtmf", {"digits": "12#"}) == {"ok": True}
    [(sid, form)] = gateway.rest_fake.updates
    root = ElementTree.fromstring(form["Twiml"])
    assert root[0].tag == "Play" and root[0].get("digits") == "12#"
    assert root.find("./Connect/Stream") is not None
    await stream.stop(call_sid)  # Twilio stops the old stream for the new TwiML
    await stream.closed()
    assert not events.of("call.ended", call_id)

    again = StreamClient(await gateway.ws())
    await again.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    assert (await request(bus, call_id, "dtmf", {"digits": "x"}))["ok"] is False
    await again.stop(call_sid)
    await events.wait("call.ended", call_id)


async def test_a_failed_dtmf_redirect_leaves_the_callers_hang_up_ending_the_call(
        make_gateway, events, bus):
    gateway = await make_gateway(rest=True)
    stream, call_sid, call_id = await started_stream(gateway, events)
    gateway.rest_fake.fail_updates_with = 500
    reply = await request(bus, call_id, "dtmf", {"digits": "1"})
    assert reply["ok"] is False and "500" in reply["error"]
    await stream.stop(call_sid)  # no redirect happened: this is the caller hanging up
    await stream.closed()
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_dtmf_without_rest_is_an_error_reply(gateway, events, bus):
    stream, _, call_id = await started_stream(gateway, events)
    reply = await request(bus, call_id, "dtmf", {"digits": "1"})
    assert reply["ok"] is False and "REST" in reply["error"]
    await stream.ws.close()


async def test_max_duration_hangs_up(make_gateway, events):
    # the agent allows 60 s; the clock says 59.7 s have already passed since the answer
    gateway = await make_gateway(clock=lambda: utcnow() + timedelta(seconds=59.7))
    stream, _, call_id = await started_stream(gateway, events)
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "max_duration"
    assert await stream.closed() == (1000, "max_duration")


async def test_max_duration_hangs_up_at_twilio_even_if_call_ended_cannot_be_published(
        make_gateway, events, bus):
    # JetStream unavailable (a leader election, an outage) when the timer fires: the
    # call.ended publish failed, the timer gave up, and the call stayed up at Twilio, billed
    gateway = await make_gateway(rest=True, clock=lambda: utcnow() + timedelta(seconds=59))
    stream, call_sid, call_id = await started_stream(gateway, events)
    await bus.js.delete_stream(EVENTS_STREAM)
    # (the publish fails after its 5 s timeout, as when JetStream is down)
    await wait_for(lambda: (call_sid, {"Status": "completed"}) in gateway.rest_fake.updates,
                   timeout=10)
    await stream.ws.close()


async def test_a_newer_stream_replaces_the_old_one(gateway, events):
    stream, call_sid, call_id = await started_stream(gateway, events)
    # Twilio, whose end of the socket went, asks the <Connect action> for the newer stream
    # (and its token: the first stream's is used up)
    await gateway.post(reconnect_path(call_id), {"CallSid": call_sid})
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    assert await stream.closed() == (1008, "replaced by a newer stream")
    await events.wait("call.stream_started", call_id, count=2)
    await newer.stop(call_sid)
    await events.wait("call.ended", call_id)


async def test_frame_seqs_keep_growing_over_the_streams_of_a_call(make_gateway, events, bus):
    # A reconnect (DTMF sent, a gateway failing over) gives the call a new stream, which
    # Twilio numbers from 1 again; media drops each frame whose seq is not above the last one.
    gap = [timedelta()]
    gateway = await make_gateway(clock=lambda: utcnow() + gap[0])
    stream, call_sid, call_id = await started_stream(gateway, events)
    seqs: list[int] = []

    async def on_in(msg):
        seqs.append(decode_frame(msg.data)[0])

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_in)
    numbers = [await stream.media(b"\xff" * 160) for _ in range(3)]
    await wait_for(lambda: len(seqs) == 3)
    gap[0] = timedelta(seconds=2)  # the carrier reconnects a little later
    await gateway.post(reconnect_path(call_id), {"CallSid": call_sid})
    newer = StreamClient(await gateway.ws())
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    numbers += [await newer.media(b"\xff" * 160) for _ in range(3)]
    await wait_for(lambda: len(seqs) == 6)
    await sub.unsubscribe()
    assert numbers == [2, 3, 4, 2, 3, 4]
    assert [carrier_sequence(seq) for seq in seqs] == numbers
    assert seqs == sorted(set(seqs))  # strictly growing: none is dropped as seen already
    await newer.stop(call_sid)
    await events.wait("call.ended", call_id)


async def test_shutdown_closes_sockets_with_going_away(make_gateway, events):
    gateway = await make_gateway()
    stream, _, _ = await started_stream(gateway, events)
    closing = asyncio.create_task(stream.closed())
    await gateway.client.server.runner.shutdown()
    assert await closing == (1001, "server shutting down")
