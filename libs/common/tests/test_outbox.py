"""Outbox: events sent at once, acks checked in the background, republished when they fail."""

import asyncio

from parley.common import events
from parley.common.bus import Bus, Outbox


def partial(call_id: str, text: str) -> events.TranscriptPartial:
    return events.TranscriptPartial(org_id="o1", call_id=call_id, text=text)


async def test_events_put_are_stored_in_order_once_drained(bus: Bus) -> None:
    outbox = Outbox(bus, name="test")
    for i in range(200):
        await outbox.put(partial("c-out1", str(i)))  # returns without waiting for acks
    await outbox.drain()
    assert outbox.pending == 0 and outbox.lost == 0 and outbox.republished == 0
    stored = await bus.replay_call("c-out1")
    assert [e.text for e in stored] == [str(i) for i in range(200)]  # type: ignore[attr-defined]


async def test_an_ack_that_comes_too_late_gets_the_event_published_again_and_stored_once(
        bus: Bus) -> None:
    # An ack timeout far below a round trip: every first ack is "late". The event was stored
    # all the same; publishing it again (same Nats-Msg-Id) must not store it twice.
    outbox = Outbox(bus, name="test", ack_timeout_s=1e-6)
    sent = [partial("c-out2", str(i)) for i in range(5)]
    for event in sent:
        await outbox.put(event)
    assert outbox.pending == 5
    await outbox.drain(timeout_s=10)
    assert outbox.pending == 0 and outbox.lost == 0 and outbox.republished == 5
    stored = await bus.replay_call("c-out2")
    assert sorted(e.id for e in stored) == sorted(e.id for e in sent)


async def test_an_event_no_stream_takes_is_counted_lost_after_its_attempts(bus: Bus) -> None:
    outbox = Outbox(bus, name="test", ack_timeout_s=0.5, attempts=2)
    await bus.js.delete_stream("EVENTS")  # nothing stores events now: every publish fails
    await outbox.put(partial("c-out3", "hello"))
    await asyncio.wait_for(outbox.drain(), 10)
    assert outbox.lost == 1 and outbox.pending == 0


async def test_an_event_that_cannot_even_be_sent_is_published_again_not_raised(
        bus: Bus) -> None:
    """``bus.send`` raising (the connection closed under a reconnect) made ``put`` raise: the
    event was lost, and the caller (the relay's idle clock, having taken the event's ordinal)
    could not send it again under the same id. It is now retried like a failed ack."""
    outbox = Outbox(bus, name="test")
    send, failures = bus.send, []

    async def send_failing_once(event, **kwargs):
        if not failures:
            failures.append(event.id)
            raise ConnectionError("nats: connection closed")
        return await send(event, **kwargs)

    bus.send = send_failing_once  # type: ignore[method-assign]
    try:
        event = partial("c-out4", "hello")
        await outbox.put(event)  # does not raise
        await outbox.drain(timeout_s=10)
    finally:
        bus.send = send  # type: ignore[method-assign]
    assert failures == [event.id]
    assert outbox.pending == 0 and outbox.lost == 0 and outbox.republished == 1
    assert [e.id for e in await bus.replay_call("c-out4")] == [event.id]


async def test_a_bus_closed_for_good_fails_the_retries_fast(nats_url: str) -> None:
    """An outbox attempt waits for a connection cut off from the server to come back (up to
    the ack timeout). At shutdown the bus closes for good, and the retries still waited their
    whole timeout each: a stopping service's outbox took attempts × ack timeout to give up."""
    bus = await Bus.connect(nats_url, name="closing")
    outbox = Outbox(bus, name="test", ack_timeout_s=5.0, attempts=3)
    await outbox.put(partial("c-out5", "hello"))  # no stream takes it: the event is retried
    await bus.close()
    began = asyncio.get_running_loop().time()
    await outbox.drain(timeout_s=30)
    # given up at once by the drain (nothing will take it), or lost after its fast attempts
    assert outbox.lost + outbox.dropped == 1 and outbox.pending == 0
    assert asyncio.get_running_loop().time() - began < 5


async def test_an_event_put_after_pending_is_stored_after_events_published_again(
        bus: Bus) -> None:
    """A call's end put straight after events JetStream refused (no stream: an outage) was
    stored first, and the events published again after it: whoever reads the call's stream saw
    events after its end. Put after what is pending, it waits for them, then is retried like
    them."""
    outbox = Outbox(bus, name="test", ack_timeout_s=0.5, attempts=10)
    await bus.js.delete_stream("EVENTS")
    try:
        for i in range(3):
            await outbox.put(partial("c-out6", str(i)))
        ended = outbox.put_after_pending(partial("c-out6", "end"), partial("c-out6", "ended"))
        await asyncio.sleep(0.3)
        assert not ended.done()
    finally:
        await bus.ensure_streams()  # the stream is back
    assert await asyncio.wait_for(ended, 30) is True
    assert outbox.pending == 0 and outbox.lost == 0
    stored = await bus.replay_call("c-out6")
    assert [e.text for e in stored][-2:] == ["end", "ended"]  # type: ignore[attr-defined]
    assert sorted(e.text for e in stored) == ["0", "1", "2", "end", "ended"]  # type: ignore[attr-defined]


async def test_a_drain_out_of_time_gives_up_and_counts_what_is_still_unconfirmed(
        bus: Bus) -> None:
    outbox = Outbox(bus, name="test", ack_timeout_s=0.5, attempts=10)
    await bus.js.delete_stream("EVENTS")
    try:
        await outbox.put(partial("c-out7", "0"))
        outbox.put_after_pending(partial("c-out7", "end"), partial("c-out7", "ended"))
        assert await outbox.drain(timeout_s=1.0) == 3
    finally:
        await bus.ensure_streams()
    assert outbox.pending == 0 and outbox.dropped == 3
    await asyncio.sleep(1.0)  # nothing given up is published again
    assert await bus.replay_call("c-out7") == []
