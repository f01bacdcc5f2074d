"""DurableConsumer with concurrency: keys in parallel, each key in order, on a real NATS."""

import asyncio

import pytest

from parley.common import events
from parley.common.bus import (
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    Bus,
    ConsumerSettings,
    DurableConsumer,
    PermanentError,
    dead_letter_subject,
)


async def wait_for(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _settings(name: str, **overrides: object) -> ConsumerSettings:
    values: dict[str, object] = {
        "durable": name, "filter_subjects": ["parley.ev.*.call.*.>"],
        "backoff_initial_s": 0.05, "ack_wait_s": 2.0}
    values.update(overrides)
    return ConsumerSettings(**values)  # type: ignore[arg-type]


def by_call(event: events.Event) -> str:
    return event.call_id  # type: ignore[attr-defined,no-any-return]


def said(call_id: str, text: str) -> events.TranscriptFinal:
    return events.TranscriptFinal(org_id="o1", call_id=call_id, text=text)


async def test_a_slow_message_does_not_hold_up_other_keys(bus: Bus) -> None:
    release = asyncio.Event()
    log: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        text = event.text  # type: ignore[attr-defined]
        log.append(f"start {text}")
        if text == "slow":
            await release.wait()
        log.append(f"end {text}")

    consumer = DurableConsumer(bus, _settings("parallel"), handler, concurrency=4, key=by_call)
    await consumer.start()
    await bus.publish(said("a", "slow"))
    await bus.publish(said("b", "quick"))
    await wait_for(lambda: "end quick" in log)
    assert "end slow" not in log  # b went past a's slow message
    release.set()
    await wait_for(lambda: consumer.processed == 2)
    await consumer.stop()
    info = await bus.js.consumer_info(EVENTS_STREAM, "parallel")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_messages_with_the_same_key_are_handled_one_after_another_in_order(
        bus: Bus) -> None:
    running: dict[str, int] = {}
    overlapped: list[str] = []
    order: dict[str, list[int]] = {"a": [], "b": []}

    async def handler(event: events.Event, _msg: object) -> None:
        call_id, text = by_call(event), event.text  # type: ignore[attr-defined]
        running[call_id] = running.get(call_id, 0) + 1
        if running[call_id] > 1:
            overlapped.append(call_id)
        await asyncio.sleep(0.01 if int(text) % 3 == 0 else 0)
        order[call_id].append(int(text))
        running[call_id] -= 1

    consumer = DurableConsumer(bus, _settings("ordered", batch=8), handler, concurrency=8,
                               key=by_call)
    await consumer.start()
    for n in range(30):
        await bus.publish(said("a", str(n)))
        await bus.publish(said("b", str(n)))
    await wait_for(lambda: consumer.processed == 60)
    await consumer.stop()
    assert order == {"a": list(range(30)), "b": list(range(30))}
    assert overlapped == []


async def test_concurrency_is_bounded(bus: Bus) -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def handler(event: events.Event, _msg: object) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    consumer = DurableConsumer(bus, _settings("bounded"), handler, concurrency=3, key=by_call)
    await consumer.start()
    for n in range(6):
        await bus.publish(said(f"c{n}", "x"))
    await wait_for(lambda: running == 3)
    await asyncio.sleep(0.3)
    assert most == 3
    release.set()
    await wait_for(lambda: consumer.processed == 6)
    await consumer.stop()
    with pytest.raises(ValueError, match="concurrency"):
        DurableConsumer(bus, _settings("bad", max_ack_pending=4), handler, concurrency=5)


async def test_stop_finishes_running_handlers_and_hands_back_the_waiting_ones(
        bus: Bus) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        text = event.text  # type: ignore[attr-defined]
        if text == "first":
            started.set()
            await release.wait()
        handled.append(text)

    settings = _settings("stopping", ack_wait_s=30.0)
    consumer = DurableConsumer(bus, settings, handler, concurrency=4, key=by_call)
    await consumer.start()
    await bus.publish(said("a", "first"))
    await bus.publish(said("a", "second"))  # waits behind "first" (same key)
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(consumer.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()  # "first" is still being handled
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert handled == ["first"]

    # "second" was handed back (nak), so the next runner gets it at once, not after ack_wait.
    again = DurableConsumer(bus, settings, handler, concurrency=4, key=by_call)
    await again.start()
    await wait_for(lambda: handled == ["first", "second"], timeout=3.0)
    await again.stop()


async def test_failures_are_retried_and_dead_lettered_per_message(bus: Bus) -> None:
    attempts: dict[str, int] = {}
    handled: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        text = event.text  # type: ignore[attr-defined]
        attempts[text] = attempts.get(text, 0) + 1
        if text == "refuse":
            raise PermanentError("never")
        if text == "flaky" and attempts[text] < 3:
            raise ConnectionError("blinked")
        handled.append(text)

    consumer = DurableConsumer(bus, _settings("mixed"), handler, concurrency=4, key=by_call)
    await consumer.start()
    await bus.js.publish("parley.ev.o1.call.x.transcript.final", b"{not json")
    await bus.publish(said("a", "refuse"))
    await bus.publish(said("b", "flaky"))
    await bus.publish(said("a", "after"))
    await wait_for(lambda: sorted(handled) == ["after", "flaky"] and consumer.dead_lettered == 2)
    await consumer.stop()
    assert attempts["flaky"] == 3
    dlq = await bus.js.pull_subscribe(dead_letter_subject("mixed"), stream=DEAD_LETTER_STREAM)
    letters = await dlq.fetch(2, timeout=2)
    reasons = sorted(m.headers["Parley-Dlq-Reason"] for m in letters)
    assert reasons[0].startswith("PermanentError: never") and "undecodable" in reasons[1]
    info = await bus.js.consumer_info(EVENTS_STREAM, "mixed")
    assert info.num_ack_pending == 0 and info.num_pending == 0
