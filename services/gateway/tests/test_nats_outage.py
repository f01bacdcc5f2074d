"""A NATS outage mid-call: the carrier's socket stays up and what it reported is not lost.

These tests run their own nats-server (killed and started again on the same port and store)
instead of the session's.
"""

import asyncio
import contextlib

import pytest

from parley.common.bus import Bus
from parley.common.bus.client import connect
from parley.gateway import orphans
from parley.gateway.calls import find_by_call_id
from parley.gateway.keys import POOL

from .conftest import started_stream, wait_for
from .test_media_stream import request


@pytest.fixture
async def bus(nats_server_of_test):
    """The gateway's bus, on this test's server: publishes time out after half a second, and
    what is sent while the server is away is buffered up to 8 KiB (nats-py's default: 2 MiB)."""
    connected = Bus(await connect(nats_server_of_test.url, name="gateway",
                                  pending_size=8 * 1024),
                    owns_connection=True, publish_timeout=0.5)
    try:
        await connected.ensure_streams()
        yield connected
    finally:
        await connected.close()


async def test_a_nats_outage_neither_drops_the_socket_nor_loses_what_it_reported(
        nats_server_of_test, bus, gateway, events):
    """nats-server killed for 8 s in a chaos run: a mark echo (or a key press) arriving
    meanwhile was published with the socket's read loop waiting on its ack, which timed out and
    failed the socket (1011): Twilio's stream ended, and the call never ended in the store."""
    stream, call_sid, call_id = await started_stream(gateway, events)
    server = await cut_off(nats_server_of_test, bus)
    await stream.mark("t1:3")
    await stream.dtmf("5")
    await asyncio.sleep(1.5)  # well past the publish timeout
    server.start()  # same port, same store
    await wait_for(lambda: bus.nc.is_connected)
    await stream.media(b"\xff" * 160)
    await wait_for(lambda: _has(stored(bus, call_id), {"agent.speech.progress", "call.dtmf"}),
                   timeout=15)
    assert not stream.ws.closed
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")
    await wait_for(lambda: _has(stored(bus, call_id), {"call.ended"}), timeout=10)


async def test_caller_audio_the_client_cannot_buffer_during_an_outage_is_dropped(
        nats_server_of_test, bus, gateway, events):
    """Cut off from NATS, the client buffers what is published (2 MiB by default: about 200
    call-seconds of audio, reached in 8 s with 25 calls) and then refuses it: the refused frame
    failed the socket, and so every call on the gateway."""
    stream, call_sid, call_id, server = await _reported_then_cut_off(
        nats_server_of_test, bus, gateway, events)
    server.start()
    await wait_for(lambda: bus.nc.is_connected)
    received: list[bytes] = []

    async def on_frame(msg) -> None:
        received.append(msg.data)

    sub = await bus.nc.subscribe(f"parley.audio.{call_id}.in", cb=on_frame)
    await bus.nc.flush()
    await stream.media(b"\x01" * 160)
    await wait_for(lambda: received, timeout=5)  # the socket goes on relaying
    await sub.unsubscribe()
    assert not stream.ws.closed
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")


async def test_what_the_socket_reported_outlasts_an_outage_the_audio_filled_the_buffer_in(
        nats_server_of_test, bus, gateway, events):
    """Its buffer full of caller audio, the cut-off client refuses a publish at once rather
    than after the publish timeout: the outbox's ten attempts at a mark echo, meant to last
    about a minute, were spent in 7 s (their backoff), and an 8 s outage lost it."""
    stream, call_sid, call_id = await started_stream(gateway, events)
    server = await cut_off(nats_server_of_test, bus)
    for _ in range(60):  # 1.2 s of audio, past the 8 KiB buffer
        await stream.media(b"\xff" * 160)
    await stream.mark("t1:3")
    await asyncio.sleep(9)
    server.start()
    await wait_for(lambda: bus.nc.is_connected)
    await wait_for(lambda: _has(stored(bus, call_id), {"agent.speech.progress"}), timeout=10)
    await stream.stop(call_sid)
    await stream.closed()


async def _has(types, wanted: set[str]) -> bool:
    return wanted <= await types


async def cut_off(server, bus):
    """nats-server killed: returns it, once the bus has noticed (start it again to end it)."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    await wait_for(lambda: not bus.nc.is_connected)
    return server


async def stored(bus, call_id: str) -> set[str]:
    """The types of the call's stored events (none while JetStream still recovers)."""
    try:
        return {event.type for event in await bus.replay_call(call_id)}
    except Exception:
        return set()


async def test_a_call_transferred_during_an_outage_is_not_hung_up_as_orphaned(
        nats_server_of_test, bus, make_gateway, events):
    """Twilio took the transfer (the caller on their way to a person) just as NATS went away:
    call.ended could not be published, so the call stayed live in the store with no stream,
    and the orphan check, finding no instance held it and Twilio had it in progress, hung the
    caller up mid-conversation with the person they were transferred to."""
    gateway = await make_gateway(rest=True, gateway_orphan_check_s=0)  # rounds run by hand
    stream, call_sid, call_id = await started_stream(gateway, events)
    gateway.rest_fake.hold_updates = asyncio.Event()
    transfer = asyncio.create_task(request(bus, call_id, "transfer", {"to": "+14155550123"}))
    await wait_for(lambda: gateway.rest_fake.updates)
    server = await cut_off(nats_server_of_test, bus)
    gateway.rest_fake.hold_updates.set()  # Twilio accepted the redirect; the end is not stored
    with contextlib.suppress(Exception):
        await transfer
    await stream.stop(call_sid)  # Twilio leaves the stream for the <Dial>
    await stream.closed()
    server.start()
    await wait_for(lambda: bus.nc.is_connected)
    unheld = await orphans.check(gateway.app, {})
    await orphans.check(gateway.app, unheld)
    assert (call_sid, {"Status": "completed"}) not in gateway.rest_fake.updates
    async with gateway.app[POOL].connection() as conn:
        call = await find_by_call_id(conn, call_id)
    assert call is not None and call.end_reason == "transferred"
    [ended] = await events.wait("call.ended", call_id, timeout=5)
    assert ended.reason == "transferred" and events.of("call.transferred", call_id)


async def _reported_then_cut_off(nats_server_of_test, bus, gateway, events):
    """A call whose socket reported a mark echo the cut-off client refused (its buffer full of
    caller audio): the echo waits in the outbox. Returns (stream, call_sid, call_id, server)."""
    stream, call_sid, call_id = await started_stream(gateway, events)
    server = await cut_off(nats_server_of_test, bus)
    for _ in range(60):  # 1.2 s of audio, past the 8 KiB buffer
        await stream.media(b"\xff" * 160)
    await stream.mark("t1:3")
    await asyncio.sleep(0.5)
    return stream, call_sid, call_id, server


async def _ended_last(bus, call_id: str) -> list[str]:
    types = [event.type for event in await bus.replay_call(call_id)]
    assert "agent.speech.progress" in types and types[-1] == "call.ended", types
    return types


async def test_a_call_ended_during_an_outage_is_stored_after_what_its_socket_reported(
        nats_server_of_test, bus, gateway, events):
    """The caller hung up (the stream's stop) while NATS was away: call.ended, published
    directly, was refused, which failed the socket (1011) and left the call never ended in the
    store; had it gone out as the server came back, it was stored before the mark echo the
    outbox was still publishing again. It now goes out after the call's outstanding events,
    retried like them."""
    stream, call_sid, call_id, server = await _reported_then_cut_off(
        nats_server_of_test, bus, gateway, events)
    await stream.stop(call_sid)
    assert await stream.closed() == (1000, "stream stopped")
    server.start()
    await wait_for(lambda: bus.nc.is_connected)
    await wait_for(lambda: _has(stored(bus, call_id), {"call.ended"}), timeout=20)
    await _ended_last(bus, call_id)


async def test_a_status_callback_ending_a_call_during_an_outage_waits_for_its_socket_events(
        nats_server_of_test, bus, gateway, events):
    """Twilio's status callback (the caller hung up) arrives while the call's socket has a mark
    echo still to publish: call.ended, not the socket's, goes after it all the same."""
    stream, call_sid, call_id, server = await _reported_then_cut_off(
        nats_server_of_test, bus, gateway, events)
    response = await gateway.post("/twilio/status", {
        "CallSid": call_sid, "CallStatus": "completed", "CallDuration": "12"})
    assert response.status < 300, await response.text()
    server.start()
    await wait_for(lambda: bus.nc.is_connected)
    await wait_for(lambda: _has(stored(bus, call_id), {"call.ended"}), timeout=20)
    await _ended_last(bus, call_id)
    await stream.ws.close()


async def test_a_stop_during_a_short_outage_gives_pending_events_time_to_go_out(
        nats_server_of_test, bus, gateway, events):
    """A deploy (SIGTERM) during a NATS blip: the app stopped at once, the bus was closed
    behind it (as ``serve`` does), and the events the outbox was still publishing again were
    dropped: a call's mark echo, its end, lost. The stop now gives them a bounded time."""
    stream, call_sid, call_id, server = await _reported_then_cut_off(
        nats_server_of_test, bus, gateway, events)

    async def stop_as_serve_does() -> None:
        await gateway.client.close()  # the app's shutdown and cleanup
        await bus.close()

    stopping = asyncio.create_task(stop_as_serve_does())
    await asyncio.sleep(1.0)  # the blip ends while the gateway stops
    server.start()
    await asyncio.wait_for(stopping, 30)
    after = Bus(await connect(nats_server_of_test.url, name="test"), owns_connection=True)
    try:
        await wait_for(lambda: _has(stored(after, call_id), {"agent.speech.progress"}),
                       timeout=10)
    finally:
        await after.close()
    assert gateway.metric("gateway_call_events_dropped_total") == 0


async def test_a_stop_with_the_bus_closed_for_good_drops_pending_events_at_once_and_counts_them(
        nats_server_of_test, bus, gateway, events, db):
    """Nothing will take them any more: the stop does not wait out its bound for them. The
    call's end, given up, gives its claim back: the orphan check ends the call later."""
    stream, call_sid, call_id, _ = await _reported_then_cut_off(
        nats_server_of_test, bus, gateway, events)
    await stream.stop(call_sid)  # the caller hangs up: call.ended waits behind the mark echo
    assert await stream.closed() == (1000, "stream stopped")
    await bus.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(gateway.client.close(), 30)
    assert loop.time() - started < 5.0
    assert gateway.metric("gateway_call_events_dropped_total") == 2
    call = await find_by_call_id(db, call_id)
    assert call is not None and not call.ended
