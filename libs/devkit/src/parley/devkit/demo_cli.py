"""``parley demo``: the platform end to end on the embedded default, then a clean shutdown.

Starts embedded NATS + Postgres and every service as its own supervised process, plays one
scripted receptionist call onto the bus as events, waits for the recorder to store it, and prints
the call's timeline and its row in the ``calls`` read model.

Until the gateway, media and brain land, the call is a script of the events those services will
emit (no audio, no speech recognition, no LLM): what this shows for real is the bus, the event
store, exactly-once recording, projections and the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time

import msgspec

from parley.common import events as ev
from parley.devkit.events_cli import timeline
from parley.devkit.infra_cli import add_dir_argument, report
from parley.devkit.local_infra import DATABASE_URL_VAR, NATS_URL_VAR, ensure_infra
from parley.devkit.supervisor import Supervisor
from parley.devkit.up_cli import SERVICES, prepare_platform, service_commands


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``parley`` parser."""
    demo = subparsers.add_parser("demo", help="run the platform, play one call, show it, stop")
    add_dir_argument(demo)
    demo.add_argument("--verbose", action="store_true", help="show the services' INFO logs")
    demo.set_defaults(handler=run_demo)


def scripted_call(org_id: str, call_id: str) -> list[tuple[float, ev.Event]]:
    """(delay before, event) for a short call to a dental office."""
    base = {"org_id": org_id, "call_id": call_id}
    return [
        (0.00, ev.CallRequested(**base, direction="inbound", agent_id="receptionist",
                                from_number="+15550100", to_number="+15550199",
                                carrier="simulator")),
        (0.05, ev.CallAnswered(**base)),
        (0.02, ev.CallStreamStarted(**base, stream_id="MZdemo", gateway_instance="demo",
                                    agent_id="receptionist")),
        (0.40, ev.SpeechStarted(**base, offset_ms=400)),
        (0.30, ev.TranscriptPartial(**base, text="how much is a")),
        (0.40, ev.TranscriptFinal(**base, text="How much is a cleaning?", provider="script")),
        (0.20, ev.TurnUserEnded(**base, turn_id="t1", text="How much is a cleaning?",
                                eou_delay_ms=200)),
        (0.01, ev.TurnStarted(**base, turn_id="t1", provider="script")),
        (0.08, ev.AgentSay(**base, turn_id="t1", seq=0, text="A cleaning is 95 dollars,")),
        (0.06, ev.AgentSay(**base, turn_id="t1", seq=1, text="and it takes about an hour.",
                           last=True)),
        (0.01, ev.TurnCompleted(**base, turn_id="t1", provider="script", ttft_ms=80)),
        (1.50, ev.CallEnded(**base, reason="caller_hangup", duration_s=3.0)),
    ]


async def _play_and_show(urls: dict[str, str]) -> int:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from parley.common.bus import Bus
    from parley.common.store import EventStore

    org_id, call_id = "demo", f"call-{secrets.token_hex(4)}"
    bus = await Bus.connect(urls[NATS_URL_VAR], name="parley-demo")
    try:
        await bus.ensure_streams()
        report(f"demo: playing call {call_id}")
        started = time.monotonic()
        for delay, event in scripted_call(org_id, call_id):
            await asyncio.sleep(delay)
            await bus.publish(msgspec.structs.replace(event, at=ev.utcnow()))
            print(f"  {time.monotonic() - started:6.2f}s  {event.type}", flush=True)
    finally:
        await bus.close()

    deadline = time.monotonic() + 30
    async with await psycopg.AsyncConnection.connect(urls[DATABASE_URL_VAR],
                                                     autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT state, duration_s, turns, end_reason FROM calls WHERE call_id = %s",
                (call_id,))
            row = await cursor.fetchone()
            if row and row[0] == "ended":
                break
            if time.monotonic() > deadline:
                report("demo: the recorder did not store the call within 30 s")
                return 1
            await asyncio.sleep(0.1)
    async with AsyncConnectionPool(urls[DATABASE_URL_VAR], min_size=1, max_size=1,
                                   open=False) as pool:
        stored = await EventStore(pool).read_aggregate(call_id)
    lags = sorted(s.recorded_at - s.event.at for s in stored)
    print(f"\nEvent timeline of {call_id} (from Postgres; `parley events show {call_id}`):")
    print("\n".join(timeline((s.position, s.event) for s in stored)))
    print(f"\ncalls projection: state={row[0]} duration={row[1]}s turns={row[2]} "
          f"end_reason={row[3]}")
    print(f"{len(stored)} events recorded exactly once; median event-to-Postgres lag "
          f"{lags[len(lags) // 2].total_seconds() * 1000:.0f} ms (the first ones waited for "
          f"the recorder to start)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; always shut the services and the servers it started down."""
    session = ensure_infra(args.dir, environ=os.environ, report=report, detach=False)
    env = dict(session.urls, PARLEY_LOG_LEVEL="INFO" if args.verbose else "WARNING")
    supervisor = Supervisor(service_commands(SERVICES), env=env, prepare=prepare_platform,
                            output=sys.stderr)

    async def main() -> int:
        supervising = asyncio.create_task(supervisor.run())
        await asyncio.sleep(0)  # let the supervisor apply migrations and start children
        try:
            result = await _play_and_show(session.urls)
        finally:
            supervisor.stop()
            await supervising
        return result

    try:
        return asyncio.run(main())
    finally:
        session.stop_started(report)
