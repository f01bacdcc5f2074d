import asyncio
import dataclasses
import datetime
import gc
import struct

import nats
import pytest
from nats.js.api import StorageType

from parley.common import events
from parley.common.bus import (
    AUDIO_STREAM,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    LEASES_BUCKET,
    Bus,
    ConsumerSettings,
    DurableConsumer,
    PermanentError,
    StreamSettings,
    call_events,
    dead_letter_subject,
    publish_frame,
    subscribe_frames,
)
from parley.common.bus.audio import (
    carrier_sequence,
    decode_frame,
    encode_frame,
    stream_seq_base,
)
from parley.common.bus.subjects import SubjectError, event_subject
from parley.devkit.infra import NatsServer
from parley.devkit.pytest_plugin import Settled


async def wait_for(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_subject_is_derived_from_org_aggregate_id_and_type() -> None:
    event = events.TranscriptFinal(org_id="o1", call_id="c9", text="hi")
    assert event_subject(event) == "parley.ev.o1.call.c9.transcript.final"
    agent = events.AgentCreated(org_id="o1", agent_id="a1", name="Ann")
    assert event_subject(agent) == "parley.ev.o1.agent.a1.agent.created"
    assert event_subject(events.QuotaExceeded(org_id="o1", kind="x", limit=1, used=2)) == \
        "parley.ev.o1.org.o1.quota.exceeded"
    assert call_events("c9", "o1", "transcript.final") == event_subject(
        events.TranscriptFinal(org_id="o1", call_id="c9", text="hi"))


def test_subject_tokens_are_validated() -> None:
    with pytest.raises(SubjectError, match="call_id"):
        call_events("c.*")


async def test_ensure_streams_is_idempotent_and_follows_settings(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, name="t")
    settings = StreamSettings(events_max_age_s=3600, audio_max_age_s=60, audio_storage="memory")
    await bus.ensure_streams(settings)
    await bus.ensure_streams(settings)
    info = await bus.js.stream_info(EVENTS_STREAM)
    assert info.config.max_age == 3600 and info.config.num_replicas == 1
    audio = await bus.js.stream_info(AUDIO_STREAM)
    assert audio.config.storage == StorageType.MEMORY and audio.config.max_age == 60
    await bus.js.stream_info(DEAD_LETTER_STREAM)
    kv = await bus.js.key_value(LEASES_BUCKET)
    assert (await kv.status()).ttl == StreamSettings().lease_ttl_s
    await bus.close()


async def test_ensure_streams_lengthens_the_lease_ttl_of_a_bucket_made_before(
        nats_url: str) -> None:
    # Call leases lived 5 s: one whose owner died while no other media instance was up expired,
    # and no instance that started later took its call up. The longer TTL reaches a bucket an
    # older version made (create_key_value refuses another configuration), its leases kept.
    bus = await Bus.connect(nats_url, name="t")
    await bus.ensure_streams(StreamSettings(lease_ttl_s=5.0))
    kv = await bus.js.key_value(LEASES_BUCKET)
    await kv.put("call-1", b"{}")
    await bus.ensure_streams()
    assert (await kv.status()).ttl == StreamSettings().lease_ttl_s >= 3600
    assert (await kv.get("call-1")).value == b"{}"
    await bus.close()


async def test_publish_awaits_ack_with_msg_id_and_trace_header(bus: Bus) -> None:
    from parley.common import tracing

    provider = tracing.configure_tracing("test", set_global=False)
    event = events.CallRinging(org_id="o1", call_id="c1")
    with tracing.tracer("test", provider).start_as_current_span("publish") as span:
        ack = await bus.publish(event)
    assert ack.stream == EVENTS_STREAM and ack.seq == 1 and not ack.duplicate
    msg = await bus.js.get_msg(EVENTS_STREAM, 1)
    assert msg.subject == "parley.ev.o1.call.c1.call.ringing"
    assert msg.headers["Nats-Msg-Id"] == str(event.id)
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert msg.headers["traceparent"].startswith(f"00-{trace_id}-")
    assert events.decode(msg.data) == event


async def test_publishing_the_same_event_twice_stores_it_once(bus: Bus) -> None:
    event = events.CallAnswered(org_id="o1", call_id="c1")
    first = await bus.publish(event)
    again = await bus.publish(event)
    assert again.duplicate and again.seq == first.seq
    assert (await bus.js.stream_info(EVENTS_STREAM)).state.messages == 1


async def test_sent_events_keep_their_order_in_the_stream_while_acks_are_awaited_later(
        bus: Bus) -> None:
    sent = [events.TranscriptPartial(org_id="o1", call_id="c7", text=str(i)) for i in range(300)]
    pending = []
    for i, event in enumerate(sent):
        if i % 50 == 49:  # an awaited publish in between takes its place in the order too
            await bus.publish(event)
        else:
            pending.append(await bus.send(event))
    acks = await bus.acked(pending)
    assert [a.seq for a in acks] == sorted(a.seq for a in acks)
    stored = await bus.replay_call("c7")
    assert [e.text for e in stored] == [str(i) for i in range(300)]  # type: ignore[attr-defined]
    again = await bus.acked([await bus.send(sent[0])])
    assert again[0].duplicate  # the same Nats-Msg-Id as publish


async def test_acks_given_up_leave_no_unretrieved_error(bus: Bus) -> None:
    # A session closing (its task cancelled) while acks are awaited, or a wait that times out,
    # gives the acks up; nothing may be left behind but that ("_GatheringFuture exception was
    # never retrieved" was logged hundreds of times by an overloaded media instance).
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        never = [loop.create_future() for _ in range(3)]  # acks that do not come
        waiting = asyncio.create_task(bus.acked(never))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        never = [loop.create_future() for _ in range(3)]
        with pytest.raises(TimeoutError):
            await Bus(bus.nc, publish_timeout=0.05).acked(never)
        assert all(future.cancelled() for future in never)
        del waiting, never
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
    finally:
        loop.set_exception_handler(previous)


async def test_subscribe_call_sees_only_that_call_live_and_in_order(bus: Bus) -> None:
    seen: list[events.Event] = []

    async def on_event(event: events.Event) -> None:
        seen.append(event)

    sub = await bus.subscribe_call("c1", on_event)
    await bus.nc.flush()
    for i in range(20):
        await bus.publish(events.TranscriptPartial(org_id="o1", call_id="c1", text=str(i)))
        await bus.publish(events.TranscriptPartial(org_id="o1", call_id="c2", text="other"))
    await wait_for(lambda: len(seen) == 20)
    assert [e.text for e in seen] == [str(i) for i in range(20)]  # type: ignore[attr-defined]
    await sub.unsubscribe()


async def test_replay_call_returns_the_calls_events_in_stream_order(bus: Bus) -> None:
    published = []
    for i in range(300):
        call = "c1" if i % 3 else "c2"
        event = events.TranscriptPartial(org_id="o1", call_id=call, text=str(i))
        await bus.publish(event)
        if call == "c1":
            published.append(event)
    assert await bus.replay_call("c1") == published
    assert await bus.replay_call("nobody") == []
    assert await bus.replay_call("c1", org_id="o2") == []


async def test_audio_frames_are_raw_bytes_with_seq_and_timestamp(bus: Bus) -> None:
    got: list[tuple[bytes, int, int]] = []

    async def on_frame(payload: bytes, seq: int, ts: int, _msg: object) -> None:
        got.append((payload, seq, ts))

    sub = await subscribe_frames(bus.nc, "c1", "in", on_frame)
    await bus.nc.flush()
    for seq in range(50):
        await publish_frame(bus.nc, "c1", "in", bytes([seq]) * 160, seq=seq, timestamp_ms=seq * 20)
    await wait_for(lambda: len(got) == 50)
    assert got[7] == (bytes([7]) * 160, 7, 140)
    await wait_for(lambda: True)
    info = await bus.js.stream_info(AUDIO_STREAM)
    assert info.state.messages == 50  # captured for replay and failover catch-up
    await sub.unsubscribe()


def test_frame_seqs_grow_over_a_calls_streams_and_old_frames_still_decode() -> None:
    started = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
    first = stream_seq_base(started) + 720_000  # four hours of 20 ms frames
    second = stream_seq_base(started + datetime.timedelta(milliseconds=1)) + 2
    assert first < second < 2**63
    assert (carrier_sequence(first), carrier_sequence(second)) == (720_000, 2)
    assert decode_frame(encode_frame(b"ab", seq=second, timestamp_ms=40, sent_ns=7)) == (
        second, 40, 7, b"ab")
    version_1 = struct.pack("<BIIQ", 1, 9, 180, 7) + b"ab"  # from a gateway not yet upgraded
    assert decode_frame(version_1) == (9, 180, 7, b"ab")


def _settings(name: str, **overrides: object) -> ConsumerSettings:
    values: dict[str, object] = {
        "durable": name, "filter_subjects": ["parley.ev.*.call.*.>"],
        "backoff_initial_s": 0.05, "ack_wait_s": 2.0}
    values.update(overrides)
    return ConsumerSettings(**values)  # type: ignore[arg-type]


async def test_consumer_acks_after_the_handler_and_retries_transient_errors(
        bus: Bus, settled: Settled) -> None:
    handled: list[str] = []
    attempts: dict[str, int] = {}

    async def handler(event: events.Event, _msg: object) -> None:
        key = event.text  # type: ignore[attr-defined]
        attempts[key] = attempts.get(key, 0) + 1
        if key == "flaky" and attempts[key] < 3:
            raise ConnectionError("database blinked")
        handled.append(key)

    consumer = DurableConsumer(bus, _settings("workers"), handler)
    await consumer.start()
    for text in ["a", "flaky", "b"]:
        await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text=text))
    await wait_for(lambda: len(handled) == 3)
    assert sorted(handled) == ["a", "b", "flaky"] and attempts["flaky"] == 3
    await consumer.stop()
    info = await settled("workers")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_poison_messages_are_dead_lettered_with_reason_and_do_not_block(
        bus: Bus, settled: Settled) -> None:
    handled: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        if event.text == "refuse":  # type: ignore[attr-defined]
            raise PermanentError("tool schema says no")
        handled.append(event.text)  # type: ignore[attr-defined]

    consumer = DurableConsumer(bus, _settings("poison"), handler)
    await consumer.start()
    await bus.js.publish("parley.ev.o1.call.c1.transcript.final", b"{not json")
    await bus.js.publish("parley.ev.o1.call.c1.call.ended",
                         b'{"type":"call.ended","org_id":"o1","call_id":"c1","duration_s":"x"}')
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="refuse"))
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="after"))
    await wait_for(lambda: handled == ["after"] and consumer.dead_lettered == 3)
    await consumer.stop()

    dlq = await bus.js.pull_subscribe(dead_letter_subject("poison"), stream=DEAD_LETTER_STREAM)
    letters = await dlq.fetch(3, timeout=2)
    reasons = [m.headers["Parley-Dlq-Reason"] for m in letters]
    assert "undecodable" in reasons[0] and "malformed" in reasons[0]
    assert "duration_s" in reasons[1]
    assert "PermanentError: tool schema says no" in reasons[2]
    assert letters[0].data == b"{not json"
    assert [m.headers["Parley-Dlq-Stream-Seq"] for m in letters] == ["1", "2", "3"]
    info = await settled("poison")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_message_that_keeps_failing_is_dead_lettered_after_max_deliver(bus: Bus) -> None:
    async def handler(event: events.Event, _msg: object) -> None:
        raise RuntimeError("always broken")

    consumer = DurableConsumer(bus, _settings("giveup", max_deliver=3), handler)
    await consumer.start()
    await bus.publish(events.CallEnded(org_id="o1", call_id="c1"))
    await wait_for(lambda: consumer.dead_lettered == 1)
    await consumer.stop()
    dlq = await bus.js.pull_subscribe(dead_letter_subject("giveup"), stream=DEAD_LETTER_STREAM)
    (letter,) = await dlq.fetch(1, timeout=2)
    assert "failed 3 times" in letter.headers["Parley-Dlq-Reason"]
    assert letter.headers["Parley-Dlq-Deliveries"] == "3"


async def test_a_dead_letter_that_cannot_be_stored_is_tried_again_and_the_runner_goes_on(
        bus: Bus, settled: Settled) -> None:
    handled: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        if event.text == "refuse":  # type: ignore[attr-defined]
            raise PermanentError("no")
        handled.append(event.text)  # type: ignore[attr-defined]

    await bus.js.delete_stream(DEAD_LETTER_STREAM)  # dead letters cannot be stored for now
    consumer = DurableConsumer(bus, _settings("dlq-down", backoff_max_s=0.5), handler)
    await consumer.start()
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="refuse"))
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="after"))
    await wait_for(lambda: handled == ["after"])  # the runner outlived the failed dead letter
    assert consumer.dead_lettered == 0
    await bus.ensure_streams()  # back: the refused message is dead-lettered on its next try
    await wait_for(lambda: consumer.dead_lettered == 1)
    await consumer.stop()
    dlq = await bus.js.pull_subscribe(dead_letter_subject("dlq-down"), stream=DEAD_LETTER_STREAM)
    (letter,) = await dlq.fetch(1, timeout=2)
    assert "PermanentError: no" in letter.headers["Parley-Dlq-Reason"]
    info = await settled("dlq-down")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_messages_waiting_behind_a_slow_handler_are_not_delivered_again(bus: Bus) -> None:
    handled: list[tuple[str, int]] = []

    async def handler(event: events.Event, msg: object) -> None:
        handled.append((event.text, msg.metadata.num_delivered))  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)  # e.g. a webhook: the later ones wait past ack_wait

    consumer = DurableConsumer(bus, _settings("slow", ack_wait_s=1.0), handler)
    await consumer.start()
    for text in "012345":
        await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text=text))
    await wait_for(lambda: consumer.processed == 6)
    # Anything delivered again while it waited is queued by now, ahead of this one.
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="last"))
    await wait_for(lambda: handled[-1][0] == "last")
    await consumer.stop()
    assert handled == [(text, 1) for text in [*"012345", "last"]]


async def test_a_consumer_that_dies_before_acking_gets_the_message_redelivered(
        nats_url: str, bus: Bus) -> None:
    dying = await Bus.connect(nats_url, name="dying")
    started = asyncio.Event()

    async def die_mid_handler(event: events.Event, _msg: object) -> None:
        started.set()
        await asyncio.sleep(3600)  # the process "dies" here: never returns, never acks

    settings = _settings("shared", ack_wait_s=1.0)
    first = DurableConsumer(dying, settings, die_mid_handler)
    await first.start()
    event = events.ToolRequested(org_id="o1", call_id="c1", turn_id="t1", tool_call_id="x",
                                 name="book")
    await bus.publish(event)
    await asyncio.wait_for(started.wait(), 5)
    first._task.cancel()  # noqa: SLF001 - simulate the crash: connection gone, no ack, no nak
    await dying.nc.close()

    survivor_got: list[tuple[events.Event, int]] = []

    async def handler(got: events.Event, msg: object) -> None:
        survivor_got.append((got, msg.metadata.num_delivered))  # type: ignore[attr-defined]

    second = DurableConsumer(bus, settings, handler)
    await second.start()
    await wait_for(lambda: len(survivor_got) == 1, timeout=10)
    assert survivor_got[0][0] == event and survivor_got[0][1] == 2
    await second.stop()


async def test_a_message_whose_deliveries_all_crashed_the_process_is_dead_lettered(
        nats_url: str, bus: Bus, settled: Settled) -> None:
    settings = _settings("crashy", ack_wait_s=1.0, max_deliver=2)
    await bus.publish(events.CallEnded(org_id="o1", call_id="c1"))
    for _ in range(settings.max_deliver):  # the poison message takes the process down each time
        dying = await Bus.connect(nats_url, name="dying")
        started = asyncio.Event()

        async def die_mid_handler(event: events.Event, _msg: object,
                                  started: asyncio.Event = started) -> None:
            started.set()
            await asyncio.sleep(3600)  # never returns, never acks

        consumer = DurableConsumer(dying, settings, die_mid_handler)
        await consumer.start()
        await asyncio.wait_for(started.wait(), 5)
        consumer._task.cancel()  # type: ignore[union-attr]  # noqa: SLF001 - the crash
        await dying.nc.close()

    handled: list[events.Event] = []

    async def handler(event: events.Event, _msg: object) -> None:
        handled.append(event)

    survivor = DurableConsumer(bus, settings, handler)
    await survivor.start()
    await wait_for(lambda: survivor.dead_lettered == 1, timeout=10)
    await survivor.stop()
    assert handled == []  # its attempts were used up: not tried a third time
    dlq = await bus.js.pull_subscribe(dead_letter_subject("crashy"), stream=DEAD_LETTER_STREAM)
    (letter,) = await dlq.fetch(1, timeout=2)
    assert "not settled in 2 deliveries" in letter.headers["Parley-Dlq-Reason"]
    assert letter.headers["Parley-Dlq-Deliveries"] == "3"
    info = await settled("crashy")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_an_existing_durable_is_updated_to_the_deliveries_the_runner_counts(
        bus: Bus) -> None:
    async def handler(event: events.Event, _msg: object) -> None:
        pass

    consumer = DurableConsumer(bus, _settings("older"), handler)
    declared_before = dataclasses.replace(consumer.consumer_config(), max_deliver=8)
    await bus.js.add_consumer(EVENTS_STREAM, declared_before)  # a deployment's durable
    await consumer.start()
    await consumer.stop()
    info = await bus.js.consumer_info(EVENTS_STREAM, "older")
    assert info.config.max_deliver == -1  # the server no longer drops exhausted messages


async def test_stop_is_graceful_and_the_durable_resumes_where_it_left_off(bus: Bus) -> None:
    seen: list[str] = []

    async def handler(event: events.Event, _msg: object) -> None:
        seen.append(event.text)  # type: ignore[attr-defined]

    consumer = DurableConsumer(bus, _settings("resume"), handler)
    await consumer.start()
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="one"))
    await wait_for(lambda: seen == ["one"])
    await consumer.stop()
    await bus.publish(events.TranscriptFinal(org_id="o1", call_id="c1", text="two"))
    again = DurableConsumer(bus, _settings("resume"), handler)
    await again.start()
    await wait_for(lambda: seen == ["one", "two"])
    await again.stop()


async def test_core_nats_connection_options(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, name="svc")
    assert bus.nc.options["max_reconnect_attempts"] == -1
    await bus.close()
    assert bus.nc.is_closed
    plain = await nats.connect(nats_url)
    wrapped = Bus(plain)
    await wrapped.close()  # does not own it: leaves it open
    assert plain.is_connected
    await plain.close()


async def test_one_trace_spans_publisher_and_consumer(bus: Bus) -> None:
    from opentelemetry import trace

    from parley.common import tracing

    tracing.configure_tracing("test-services")
    seen_trace_ids: list[int] = []

    async def handler(event: events.Event, _msg: object) -> None:
        seen_trace_ids.append(trace.get_current_span().get_span_context().trace_id)

    consumer = DurableConsumer(bus, _settings("traced"), handler)
    await consumer.start()
    with tracing.tracer("gateway").start_as_current_span("webhook") as span:
        await bus.publish(events.CallAnswered(org_id="o1", call_id="c1"))
    await wait_for(lambda: len(seen_trace_ids) == 1)
    await consumer.stop()
    assert seen_trace_ids == [span.get_span_context().trace_id]


async def test_replay_skips_a_message_that_is_not_an_event(bus: Bus) -> None:
    first = events.TranscriptPartial(org_id="o1", call_id="c9", text="one")
    last = events.TranscriptPartial(org_id="o1", call_id="c9", text="two")
    await bus.publish(first)
    await bus.js.publish("parley.ev.o1.call.c9.transcript.partial", b"not json")
    await bus.publish(last)
    assert await bus.replay_call("c9") == [first, last]


async def test_a_replay_that_stalls_goes_on_from_where_it_was(bus: Bus, monkeypatch) -> None:
    # A fetch that timed out mid-replay (a reconnect, a busy server) was taken for the stream
    # having shrunk: the replay ended there and the brain folded half the call as all of it.
    published = [events.TranscriptPartial(org_id="o1", call_id="c5", text=str(i))
                 for i in range(6)]
    for event in published:
        await bus.publish(event)
    fetch, fetches = nats.js.JetStreamContext.PullSubscription.fetch, []

    async def stalls_once(self, *args, **kwargs):  # the second fetch gets nothing in time
        fetches.append(args)
        if len(fetches) == 2:
            raise nats.errors.TimeoutError
        return await fetch(self, *args, **kwargs)

    monkeypatch.setattr(nats.js.JetStreamContext.PullSubscription, "fetch", stalls_once)
    assert [event async for _, event in bus.replay(call_events("c5"), batch=2)] == published

    async def stalls(self, *args, **kwargs):  # no answer at all: an error, not part of the call
        raise nats.errors.TimeoutError

    monkeypatch.setattr(nats.js.JetStreamContext.PullSubscription, "fetch", stalls)
    with pytest.raises(TimeoutError, match="stalled"):
        await bus.replay_call("c5")
    monkeypatch.setattr(nats.js.JetStreamContext.PullSubscription, "fetch", fetch)
    assert await bus.replay_call("c5") == published


async def test_close_while_nats_is_down_closes_without_draining(tmp_path) -> None:
    # A service stopped during a NATS outage: drain() refuses while reconnecting, which made
    # every such stop a traceback and exit status 1.
    server = NatsServer(tmp_path).start()
    bus = await Bus.connect(server.url, name="svc")
    server.stop()
    await wait_for(lambda: bus.nc.is_reconnecting)
    await bus.close()
    assert bus.nc.is_closed


async def test_close_while_nats_is_down_with_publishes_buffered_closes_all_the_same(
        tmp_path) -> None:
    """A service stopped during a NATS outage after publishing meanwhile (a gateway's caller
    audio, an outbox's retries): nats-py flushes what it buffered into the lost connection, and
    the close raised ConnectionResetError: the stop ended in a traceback and exit status 1."""
    server = NatsServer(tmp_path).start()
    bus = await Bus.connect(server.url, name="svc")

    async def ignore(msg) -> None:
        pass

    sub = await bus.nc.subscribe("parley.test.>", cb=ignore)
    server.stop()
    await wait_for(lambda: bus.nc.is_reconnecting)
    await bus.nc.publish("parley.test.buffered", b"x" * 1024)  # buffered until reconnected
    await bus.close()
    assert bus.nc.is_closed
    await asyncio.sleep(0)
    assert sub._wait_for_msgs_task is not None and sub._wait_for_msgs_task.done()
