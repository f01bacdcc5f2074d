"""DTMF on a Media Streams call: a redirect to TwiML that plays the digits, then a new stream.

The old stream's stop ends nothing; the call lives on in the next stream, which may start on
any instance. A caller who hangs up while the digits play never gets one, and an inbound call
has no status callback of ours to say so: the call must still end.
"""

import asyncio

from .conftest import StreamClient, live_calls, started_stream, wait_for
from .test_media_stream import request

FAST = {"gateway_carrier_reconnect_wait_s": 0.3}  # + 0.5 s to play a digit


async def redirected_for_digits(gateway, events, bus, digits="1"):
    """A started call whose agent sent ``digits``; Twilio has stopped the stream for them."""
    stream, call_sid, call_id = await started_stream(gateway, events)
    assert await request(bus, call_id, "dtmf", {"digits": digits}) == {"ok": True}
    await stream.stop(call_sid)
    await stream.closed()
    return call_sid, call_id


async def test_a_caller_who_hangs_up_while_the_digits_play_ends_the_call(make_gateway, events,
                                                                          bus):
    gateway = await make_gateway(rest=True, **FAST)
    loop = asyncio.get_running_loop()
    call_sid, call_id = await redirected_for_digits(gateway, events, bus)
    stopped = loop.time()
    gateway.rest_fake.caller_hangs_up(call_sid, duration_s=42)
    # no new stream comes; Twilio, asked once the digits and a reconnect had time, says why
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert loop.time() - stopped >= 0.5 + 0.3
    assert ended.reason == "caller_hangup" and ended.duration_s == 42
    assert gateway.rest_fake.fetches == [call_sid]
    assert [form.keys() for _, form in gateway.rest_fake.updates] == [{"Twiml"}]  # no hang-up
    assert call_id not in live_calls(gateway)


async def test_a_call_still_live_at_twilio_without_a_new_stream_is_hung_up(make_gateway, events,
                                                                           bus):
    gateway = await make_gateway(rest=True, **FAST)
    call_sid, call_id = await redirected_for_digits(gateway, events, bus, digits="12")
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "error"
    assert gateway.rest_fake.fetches == [call_sid]
    # (call.ended is published first, then Twilio is asked to hang up)
    await wait_for(lambda: gateway.rest_fake.updates[-1][1] == {"Status": "completed"})
    assert gateway.rest_fake.updates[-1] == (call_sid, {"Status": "completed"})


async def test_a_call_back_on_a_new_stream_on_another_instance_goes_on(make_gateway, events,
                                                                       bus):
    gateway = await make_gateway(rest=True, **FAST)
    other = await make_gateway(rest=True, instance_id="gw-other", **FAST)
    call_sid, call_id = await redirected_for_digits(gateway, events, bus)
    newer = StreamClient(await other.ws())  # the digits played; Twilio connects elsewhere
    await newer.start(call_sid, call_id)
    await events.wait("call.stream_started", call_id, count=2)
    for _ in range(12):  # past the wait, streaming as Twilio does
        await newer.media(b"\xff" * 160)
        await asyncio.sleep(0.1)
    assert events.of("call.ended", call_id) == []
    assert gateway.rest_fake.fetches == [] and len(gateway.rest_fake.updates) == 1
    await newer.stop(call_sid)
    [ended] = await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_gateway_stopping_while_the_digits_play_ends_a_call_the_caller_left(
        make_gateway, events, bus):
    gateway = await make_gateway(rest=True, shutdown_timeout=0.5,
                                 gateway_carrier_reconnect_wait_s=60)
    call_sid, call_id = await redirected_for_digits(gateway, events, bus)
    gateway.rest_fake.caller_hangs_up(call_sid, duration_s=7)
    await asyncio.wait_for(gateway.client.close(), 10)  # decided at once, not in 60 s
    [ended] = events.of("call.ended", call_id) or await events.wait("call.ended", call_id)
    assert ended.reason == "caller_hangup"


async def test_a_gateway_stopping_while_the_digits_play_leaves_a_live_call_to_its_next_stream(
        make_gateway, events, bus):
    """Twilio has the call in progress: the digits are still playing, and the new stream will
    start on another instance. Hanging up would cut the one healthy call that a stopping
    gateway otherwise hands over (its other calls reconnect elsewhere)."""
    gateway = await make_gateway(rest=True, shutdown_timeout=0.5,
                                 gateway_carrier_reconnect_wait_s=60)
    call_sid, call_id = await redirected_for_digits(gateway, events, bus, digits="123456")
    await asyncio.wait_for(gateway.client.close(), 10)
    await asyncio.sleep(0.2)
    assert gateway.rest_fake.fetches == [call_sid]
    assert events.of("call.ended", call_id) == [] and len(gateway.rest_fake.updates) == 1
