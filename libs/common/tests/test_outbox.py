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
