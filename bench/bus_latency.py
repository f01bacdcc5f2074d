"""bus_latency: one event, publish → a core subscriber on a second connection, loopback.

Budget (ARCHITECTURE.md §8): event publish → core subscriber, p50 ≤ 0.3 ms.

Publisher and subscriber live in one process (one event loop), so both ends read the same
``time.perf_counter_ns`` clock: the publisher notes the time in a side dict keyed by event id just
before it starts publishing; the subscriber — ``Bus.subscribe_call`` on its own connection, i.e.
what a service following a live call runs — looks it up when its handler receives the decoded
event. One event is in flight at a time (the next is published once the previous arrived), so
this is the unloaded latency, including the encode, the client's write, the server's routing,
the client's read and parse, the event decode and the event-loop hops in between.

Two publish paths:
- ``jetstream``: ``Bus.publish`` (EVENTS stream, ``Nats-Msg-Id``, awaits the ack), as services
  publish domain events. The core subscriber gets the message when the server stores it, usually
  before the ack is back; the ack round trip is reported as its own line.
- ``core``: ``nc.publish`` of the encoded bytes on the same subject (no ack; the stream still
  captures it), the cheapest way onto the wire.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from _stats import BenchResult, Budget, Line, latency_summary

from parley.common import events as ev
from parley.common.bus import Bus
from parley.common.bus.subjects import event_subject

BUDGET_P50_MS = 0.3
CALL_ID = "call-latency"


def _event(seq: int) -> ev.AgentSay:
    # agent.say is the hot event of a turn: brain → media, clause by clause.
    return ev.AgentSay(org_id="org-1", call_id=CALL_ID, turn_id=f"t{seq // 4}", seq=seq % 4,
                       text="Let me check the calendar for Thursday afternoon.", last=seq % 4 == 3)


async def _measure(publisher: Bus, subscriber: Bus, variant: str, *, samples: int, warmup: int,
                   timeout_s: float) -> tuple[list[int], list[int]]:
    """Per-event publish→receive latencies (ns) and, for JetStream, publish→ack times (ns)."""
    loop = asyncio.get_running_loop()
    started: dict[uuid.UUID, int] = {}  # event id → perf_counter_ns when publishing began
    latencies: dict[uuid.UUID, int] = {}
    waiting: dict[uuid.UUID, asyncio.Future[None]] = {}

    async def on_event(event: ev.Event) -> None:
        received = time.perf_counter_ns()
        began = started.pop(event.id, None)
        if began is not None:
            latencies[event.id] = received - began
        future = waiting.pop(event.id, None)
        if future is not None and not future.done():
            future.set_result(None)

    subscription = await subscriber.subscribe_call(CALL_ID, on_event)
    await subscriber.nc.flush()  # the server knows the interest before the first publish
    samples_ns: list[int] = []
    acks: list[int] = []
    deadline = loop.time() + timeout_s
    try:
        for seq in range(warmup + samples):
            if loop.time() > deadline:
                raise TimeoutError(f"{variant}: only {len(samples_ns)} samples in {timeout_s}s")
            event = _event(seq)
            arrived = loop.create_future()
            waiting[event.id] = arrived
            began = time.perf_counter_ns()
            started[event.id] = began
            if variant == "jetstream":
                await publisher.publish(event)
                acked = time.perf_counter_ns() - began
            else:
                await publisher.nc.publish(event_subject(event), ev.encode(event))
                acked = 0
            await asyncio.wait_for(arrived, 2.0)
            latency = latencies.pop(event.id)
            if seq >= warmup:
                samples_ns.append(latency)
                if acked:
                    acks.append(acked)
    finally:
        await subscription.unsubscribe()
    return samples_ns, acks


async def run(ctx: Any) -> BenchResult:
    """Measure both variants on a fresh EVENTS stream."""
    samples = 1_000 if ctx.quick else 10_000
    warmup = 200 if ctx.quick else 1_000
    result = BenchResult("bus_latency", config={
        "samples per variant": f"{samples:,} after {warmup:,} warm-up events",
        "event": "agent.say (~260 bytes JSON), one in flight at a time",
        "transport": "nats-server on 127.0.0.1, publisher and subscriber on separate "
                     "connections in one asyncio loop (no uvloop)",
        "clock": "time.perf_counter_ns on both ends (same process)",
    })
    publisher = await ctx.servers.clean_bus("bench-publisher")
    subscriber = await Bus.connect(ctx.servers.nats().url, name="bench-subscriber")
    try:
        for variant in ("jetstream", "core"):
            ctx.log(f"  {variant}: {samples:,} samples")
            latencies, acks = await _measure(publisher, subscriber, variant, samples=samples,
                                             warmup=warmup, timeout_s=ctx.time_left() - 5)
            summary = latency_summary(latencies)
            result.lines.append(Line(
                f"bus_latency.{variant}", "ms", summary["p50"], summary["p99"],
                budget=Budget("median", "<=", BUDGET_P50_MS), summary=summary,
                note=("`Bus.publish` (JetStream, awaits ack) → core `subscribe_call` handler"
                      if variant == "jetstream" else
                      "core `nc.publish(subject, encode(event))` → core `subscribe_call` "
                      "handler")))
            if acks:
                ack_summary = latency_summary(acks)
                result.lines.append(Line(
                    "bus_latency.jetstream_ack", "ms", ack_summary["p50"], ack_summary["p99"],
                    summary=ack_summary,
                    note="`Bus.publish` call → PubAck returned (the publisher's wait); "
                         "no budget"))
    finally:
        await subscriber.close()
        await publisher.close()
    return result
