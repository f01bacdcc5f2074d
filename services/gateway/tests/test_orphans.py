"""Calls a killed gateway left: no socket holds them, and nothing else would ever end them."""

import asyncio

from .conftest import started_stream, wait_for


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
