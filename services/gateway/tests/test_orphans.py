"""Calls a killed gateway left: no socket holds them, and nothing else would ever end them."""

import asyncio

from parley.gateway import orphans

from . import test_plivo_support as support
from .conftest import StreamClient, live_calls, started_stream, wait_for
from .test_dtmf_redirect import redirected_for_digits
from .test_media_stream import request
from .test_plivo_support import started_plivo_stream

# the shared Plivo fixtures, made visible to pytest in this module
make_plivo_gateway = support.make_plivo_gateway
plivo_number = support.plivo_number


async def test_a_call_no_instance_holds_is_hung_up_and_ended(make_gateway, events):
    """A gateway SIGKILLed mid-call (a chaos run): its sockets died with it, Twilio's request
    to the reconnect URL found no gateway, and the calls, inbound with no status callback of
    ours, never ended in the store (nor at Twilio, had it kept them up)."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.2)
    call_sid, call_id, _ = await gateway.inbound_call()  # answered; its socket never came
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"  # then hung up at Twilio
    await wait_for(lambda: (call_sid, {"Status": "completed"}) in gateway.rest_fake.updates)


async def test_a_call_twilio_has_over_ends_as_the_callers_hang_up(make_gateway, events):
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.2)
    call_sid, call_id, _ = await gateway.inbound_call()
    gateway.rest_fake.caller_hangs_up(call_sid, duration_s=42)
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert (ended.reason, ended.duration_s) == ("caller_hangup", 42.0)
    assert gateway.rest_fake.updates == []


async def test_a_call_twilio_does_not_know_is_ended(make_gateway, events):
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.2)
    call_sid, call_id, _ = await gateway.inbound_call()
    gateway.rest_fake.unknown.add(call_sid)  # a fetch answers 404
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error" and gateway.rest_fake.updates == []


async def test_a_call_whose_socket_is_up_is_left_alone(make_gateway, events):
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0.1)
    stream, call_sid, call_id = await started_stream(gateway, events)
    await asyncio.sleep(1.0)  # ten rounds
    assert events.of("call.ended", call_id) == []
    assert gateway.rest_fake.updates == [] and not stream.ws.closed
    await stream.stop(call_sid)
    await wait_for(lambda: events.of("call.ended", call_id))


async def test_a_call_between_streams_at_two_rounds_is_left_alone(make_gateway, events, bus):
    """An agent working through a phone menu sends digits often, and each time the call has no
    socket for a few seconds (the digits play, then a new stream starts). A round that found it
    so, and the next that found it so again though it had been back on a stream in between,
    took it for a call no instance held: Twilio, asked, had it in progress, and it was hung up
    mid-conversation."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)  # rounds run by hand
    call_sid, call_id = await redirected_for_digits(gateway, events, bus)
    await wait_for(lambda: call_id not in live_calls(gateway))
    unheld = await orphans.check(gateway.app, {})
    assert call_id in unheld  # the digits are playing
    newer = StreamClient(await gateway.ws())  # then Twilio connects the next stream
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    assert await request(bus, call_id, "dtmf", {"digits": "2"}) == {"ok": True}
    await newer.stop(call_sid)  # more digits: between streams again at the next round
    await newer.closed()
    await orphans.check(gateway.app, unheld)
    assert events.of("call.ended", call_id) == []
    assert (call_sid, {"Status": "completed"}) not in gateway.rest_fake.updates


async def test_calls_past_the_first_batch_are_looked_at(make_gateway, events, monkeypatch):
    """A round read the BATCH (1000) calls answered first: with more live calls than that, one
    answered later that no instance held was never looked at, and never ended."""
    monkeypatch.setattr(orphans, "BATCH", 1)
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)  # rounds run by hand
    stream, held_sid, held_id = await started_stream(gateway, events)  # answered first
    call_sid, call_id, _ = await gateway.inbound_call()  # answered later; its socket never came
    unheld = await orphans.check(gateway.app, {})
    await orphans.check(gateway.app, unheld)
    [ended] = await events.wait("call.ended", call_id, timeout=2)
    assert ended.reason == "error"
    assert events.of("call.ended", held_id) == [] and not stream.ws.closed


async def test_a_plivo_call_no_instance_holds_is_hung_up_and_ended(make_plivo_gateway, events):
    """The same for Plivo: its gateway killed mid-call, its socket gone, and nothing ever ended
    it in the store (nor at Plivo, had it kept the call up)."""
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.2)
    call_uuid, call_id, _ = await gateway.answer()  # answered; its socket never came
    gateway.api.live[call_uuid] = "in-progress"
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"  # then hung up at Plivo
    await wait_for(lambda: call_uuid in gateway.api.hung_up)


async def test_a_call_plivo_has_over_ends_as_the_callers_hang_up(make_plivo_gateway, events):
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.2)
    call_uuid, call_id, _ = await gateway.answer()
    gateway.api.ended[call_uuid] = 42  # not live; its record says 42 s
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert (ended.reason, ended.duration_s) == ("caller_hangup", 42.0)
    assert gateway.api.hung_up == []


async def test_a_call_plivo_does_not_know_is_ended(make_plivo_gateway, events):
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.2)
    call_uuid, call_id, _ = await gateway.answer()  # neither live nor recorded: 404 twice
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error" and gateway.api.hung_up == []


async def test_a_plivo_call_whose_socket_is_up_is_left_alone(make_plivo_gateway, events):
    gateway = await make_plivo_gateway(gateway_orphan_check_s=0.1)
    stream, call_uuid, call_id = await started_plivo_stream(gateway, events)
    gateway.api.live[call_uuid] = "in-progress"
    await asyncio.sleep(1.0)  # ten rounds
    assert events.of("call.ended", call_id) == []
    assert gateway.api.hung_up == [] and not stream.ws.closed
