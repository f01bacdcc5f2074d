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
from parley.devkit.pytest_plugin import Settled


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


def recording(bus: Bus, name: str, **settings: object) -> tuple[DurableConsumer, list[str]]:
    """A one-at-a-time consumer that keeps the text of every event it handles, in order."""
    handled: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        handled.append(event.text)  # type: ignore[attr-defined]

    return DurableConsumer(bus, _settings(name, **settings), handler), handled


async def test_a_slow_message_does_not_hold_up_other_keys(bus: Bus, settled: Settled) -> None:
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
    info = await settled("parallel")
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


async def test_failures_are_retried_and_dead_lettered_per_message(
        bus: Bus, settled: Settled) -> None:
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
    info = await settled("mixed")
    assert info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_each_message_is_handled_as_it_is_stored_not_when_a_batch_fills(
        bus: Bus, concurrency: int) -> None:
    # Messages one at a time, with quiet gaps between them, and a batch of 32 that never fills:
    # each is handled at once, not when the batch fills or a fetch times out.
    delays: list[float] = []

    async def handler(event: events.Event, _msg: object) -> None:
        delays.append(asyncio.get_running_loop().time() - float(event.text))  # type: ignore[attr-defined]

    consumer = DurableConsumer(bus, _settings(f"prompt{concurrency}", batch=32), handler,
                               concurrency=concurrency, key=by_call)
    await consumer.start()
    for n in range(8):
        await asyncio.sleep(0.15 + 0.05 * n)
        await bus.publish(said(f"c{n}", str(asyncio.get_running_loop().time())))
    await wait_for(lambda: len(delays) == 8)
    await consumer.stop()
    assert max(delays) < 0.1, delays


async def test_pull_requests_are_renewed_and_do_not_pile_up(bus: Bus) -> None:
    from parley.common.bus import consumer as consumer_module
    consumer, handled = recording(bus, "renewed", batch=4)
    original = consumer_module.PULL_EXPIRES_S
    consumer_module.PULL_EXPIRES_S = 0.3  # several requests run their course during the test
    try:
        await consumer.start()
        await asyncio.sleep(1.0)
        info = await bus.js.consumer_info(EVENTS_STREAM, "renewed")
        assert info.num_waiting <= 1  # one request of 4 at a time, not one per lapse
        for n in range(10):  # more than a request's batch: the runner asks again as they come
            await bus.publish(said("a", f"m{n}"))
        await wait_for(lambda: len(handled) == 10)
        assert handled == [f"m{n}" for n in range(10)]
    finally:
        consumer_module.PULL_EXPIRES_S = original
        await consumer.stop()


async def test_a_consumer_keeps_working_after_the_server_crashes(tmp_path) -> None:
    # A crashed server forgets its waiting pull requests; the runner must ask again once
    # reconnected rather than wait for requests that will never be answered.
    from parley.devkit.infra import NatsServer

    server = NatsServer(tmp_path / "nats").start()
    bus = await Bus.connect(server.url, name="restart")
    try:
        await bus.ensure_streams()
        consumer, handled = recording(bus, "restarted")
        await consumer.start()
        await bus.publish(said("a", "before"))
        await wait_for(lambda: handled == ["before"])
        assert server.proc is not None
        server.proc.kill()  # a crash: no "server shutdown" status ends the waiting requests
        server.proc.wait()
        server.start()  # same port, same store: the stream and the durable are still there
        await wait_for(lambda: bus.nc.is_connected and bus.nc.stats["reconnects"] == 1)
        for attempt in range(50):  # JetStream takes a moment to recover after a crash
            try:
                await bus.publish(said("a", "after"))
                break
            except Exception:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        published = asyncio.get_running_loop().time()
        # "before" may come again: its ack may not have reached the disk before the crash.
        await wait_for(lambda: "after" in handled, timeout=5.0)
        assert set(handled) == {"before", "after"}
        # Asked again within a second of the reconnect, not after the lost requests' expiry.
        assert asyncio.get_running_loop().time() - published < 3.0
        await consumer.stop()
    finally:
        await bus.close()
        server.stop()


async def test_a_deleted_consumer_is_reported_and_work_resumes_once_it_is_back(
        bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    consumer, handled = recording(bus, "deleted")
    await consumer.start()
    await bus.publish(said("a", "before"))
    await wait_for(lambda: handled == ["before"])
    sent = bus.nc.stats["out_msgs"]
    await bus.js.delete_consumer(EVENTS_STREAM, "deleted")  # an operator's mistake
    await asyncio.sleep(1.5)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["deleted: pull request refused: 409 Consumer Deleted",  # each said once
                       "deleted: pull request refused: 503 no responders: the consumer does "
                       "not exist"]
    assert bus.nc.stats["out_msgs"] - sent <= 4  # asked again after a pause, not in a loop
    await bus.js.add_consumer(EVENTS_STREAM, consumer.consumer_config())  # put back (new
    await bus.publish(said("a", "after"))  # consumers start at the stream's beginning)
    await wait_for(lambda: handled[-1:] == ["after"])
    await consumer.stop()
