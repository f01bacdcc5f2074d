"""``parley events …``: read the event store and the live bus while debugging a call.

- ``show <call>``: a call's timeline with the time between steps (Postgres, or the stream), and
  the positions of it the recorder could not store (dead letters, with the reason);
- ``tail [--org] [--type]``: follow events live;
- ``rebuild <projection>``: rebuild a read model from ``events`` and swap it in;
- ``schema``: export the catalog as JSON Schema and docs/events.md.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from parley.common import events as ev
from parley.common.events import schema
from parley.devkit.errors import CommandError
from parley.devkit.infra import InfraError
from parley.devkit.local_infra import read_env_file

if TYPE_CHECKING:
    from parley.common.bus import Bus
    from parley.common.store import DeadLetter

_ENVELOPE = {"type", "id", "org_id", "at", "causation_id", "v"}
# How long a command waits for a server before saying it cannot reach it.
CONNECT_TIMEOUT_S = 5.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``parley events`` and its subcommands."""
    parser = subparsers.add_parser("events", help="inspect, follow and rebuild events")
    parser.add_argument("--dir", type=Path, default=Path(".parley"),
                        help="where `parley infra up` wrote env (default .parley)")
    commands = parser.add_subparsers(title="events commands", metavar="COMMAND", required=True)

    show = commands.add_parser("show", help="a call's timeline with per-step latency")
    show.add_argument("call_id")
    show.add_argument("--org", help="only this org's events")
    show.add_argument("--from-stream", action="store_true",
                      help="read JetStream instead of Postgres (before the recorder caught up)")
    show.add_argument("--json", action="store_true", help="one JSON event per line")
    show.set_defaults(handler=lambda args: asyncio.run(_show(args)))

    tail = commands.add_parser("tail", help="follow events live")
    tail.add_argument("--org", default="*")
    tail.add_argument("--type", dest="event_type", help="e.g. transcript.final")
    tail.add_argument("--limit", type=int, default=0, help="exit after this many events")
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(handler=lambda args: asyncio.run(_tail(args)))

    rebuild = commands.add_parser("rebuild", help="rebuild a projection from the event store")
    rebuild.add_argument("projection", help="e.g. calls, audit_log")
    rebuild.set_defaults(handler=lambda args: asyncio.run(_rebuild(args)))

    export = commands.add_parser("schema", help="export the event catalog")
    export.add_argument("--json", type=Path, help="write JSON Schema here (default: stdout)")
    export.add_argument("--markdown", type=Path, help="write the reference page here")
    export.set_defaults(handler=_schema)


def server_url(root: Path, variable: str) -> str:
    """A server URL from the environment, else from ``.parley/env``."""
    url = os.environ.get(variable) or read_env_file(root).get(variable)
    if not url:
        raise SystemExit(f"parley: {variable} is not set; run `parley infra up` or set it")
    return url


def checked_id(value: str, what: str) -> str:
    """``value`` if it can be an id (a subject token), else a :class:`CommandError`."""
    if not ev.is_token(value):
        raise CommandError(f"{what} {value!r} is not a valid id (1-128 letters, digits, _ or -)")
    return value


def checked_event_type(value: str) -> str:
    """``value`` if it is an event type of the catalog, else a :class:`CommandError`."""
    if value not in ev.EVENT_TYPES:
        close = difflib.get_close_matches(value, ev.EVENT_TYPES, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see docs/events.md"
        raise CommandError(f"unknown event type {value!r}; {hint}")
    return value


def where(url: str) -> str:
    """A server URL's host and port, without credentials (for messages)."""
    return urlsplit(url).netloc.rpartition("@")[2] or url


async def connect_bus(root: Path) -> Bus:
    """Connect to NATS, or raise :class:`InfraError` if it cannot be reached in time.

    Only the first connection is bounded: once connected, a restarted server is waited for.
    """
    from nats.errors import Error as NatsError

    from parley.common.bus import Bus

    url = server_url(root, "PARLEY_NATS_URL")
    last_error: list[Exception] = []

    async def remember(exc: Exception) -> None:
        last_error[:] = [exc]

    try:
        return await asyncio.wait_for(Bus.connect(url, name="parley-cli", error_cb=remember),
                                      CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, NatsError) as exc:
        reason = last_error[0] if last_error else exc
        raise InfraError(f"cannot reach NATS at {where(url)}: {reason}") from None


async def check_postgres(url: str) -> None:
    """Raise :class:`InfraError` saying why if Postgres cannot be reached in time."""
    import psycopg

    try:
        connection = await psycopg.AsyncConnection.connect(
            url, connect_timeout=max(2, int(CONNECT_TIMEOUT_S)))
    except psycopg.OperationalError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InfraError(f"cannot reach Postgres at {where(url)}: {reason}") from None
    await connection.close()


def summarize(event: ev.Event) -> str:
    """The event's own fields as ``key=value`` pairs, long values shortened."""
    fields = ev.to_builtins(event)
    parts = []
    for key, value in fields.items():
        if key in _ENVELOPE or key == event.aggregate_field or value in ("", None, [], {}):
            continue
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        if len(text) > 60:
            text = text[:57] + "..."
        parts.append(f"{key}={text!r}" if isinstance(value, str) else f"{key}={text}")
    return " ".join(parts)


def timeline(rows: Iterable[tuple[int, ev.Event]]) -> list[str]:
    """Readable lines: position, time since the first event, time since the previous one."""
    lines: list[str] = []
    first: datetime | None = None
    previous: datetime | None = None
    for position, event in rows:
        first = first or event.at
        since_start = (event.at - first).total_seconds()
        step = "" if previous is None else f"+{(event.at - previous).total_seconds() * 1000:.0f}ms"
        previous = event.at
        lines.append(f"{position:>8}  {since_start:>8.3f}s  {step:>9}  {event.type:<26} "
                     f"{summarize(event)}".rstrip())
    return lines


def dead_letter_line(letter: DeadLetter) -> str:
    """A timeline line for a position of the call that the recorder could not store."""
    return f"{letter.position:>8}  {'':>8}   {'':>9}  {'(dead letter)':<26} {letter.reason}"


async def _show(args: argparse.Namespace) -> int:
    rows: Sequence[tuple[int, ev.Event]]
    dead: list[DeadLetter] = []
    checked_id(args.call_id, "call id")
    if args.org is not None:
        checked_id(args.org, "org id")
    if args.from_stream:
        from parley.common.bus import call_events

        bus = await connect_bus(args.dir)
        try:
            rows = [r async for r in bus.replay(call_events(args.call_id, args.org or "*"))]
        finally:
            await bus.close()
    else:
        from psycopg_pool import AsyncConnectionPool, PoolTimeout

        from parley.common.store import EventStore

        url = server_url(args.dir, "PARLEY_DATABASE_URL")
        await check_postgres(url)  # the pool would retry in silence, then time out
        try:
            async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False,
                                           timeout=CONNECT_TIMEOUT_S) as pool:
                store = EventStore(pool)
                stored = await store.read_aggregate("call", args.call_id, org_id=args.org)
                # What the recorder could not store is part of the story (the stream path
                # logs what it skips).
                dead = await store.read_dead_letters("call", args.call_id, org_id=args.org)
        except PoolTimeout:
            raise InfraError(f"cannot reach Postgres at {where(url)}") from None
        rows = [(s.position, s.event) for s in stored]
    if not rows and not dead:
        print(f"no events for call {args.call_id}", file=sys.stderr)
        return 1
    if args.json:
        for _, event in rows:
            print(ev.encode(event).decode())
        for letter in dead:
            print(f"parley: position {letter.position} of call {args.call_id} is a dead "
                  f"letter: {letter.reason}", file=sys.stderr)
        return 0
    org = rows[0][1].org_id if rows else dead[0].subject.split(".")[2]
    counted = f"{len(rows)} events" + (f", {len(dead)} dead letter{'s' * (len(dead) > 1)}"
                                       if dead else "")
    start = f"  from {rows[0][1].at.isoformat()}" if rows else ""
    print(f"call {args.call_id}  org {org}  {counted}{start}")
    lines = dict(zip([position for position, _ in rows], timeline(rows), strict=True))
    lines.update((letter.position, dead_letter_line(letter)) for letter in dead)
    print("\n".join(lines[position] for position in sorted(lines)))
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from parley.common.bus import events_of_type, org_events
    from parley.common.bus.subjects import EVENTS_PREFIX

    if args.org != "*":
        checked_id(args.org, "org id")
    if args.event_type:
        checked_event_type(args.event_type)
        subject = events_of_type(args.event_type, args.org)
    else:
        subject = f"{EVENTS_PREFIX}.>" if args.org == "*" else org_events(args.org)
    bus = await connect_bus(args.dir)
    done = asyncio.Event()
    seen = 0

    async def on_message(msg: Any) -> None:
        nonlocal seen
        if done.is_set():  # --limit reached; the rest of the delivered batch is dropped
            return
        try:
            event = ev.decode(msg.data)
        except ev.EventDecodeError as exc:
            print(f"!! {msg.subject}: {exc}", flush=True)
            return
        seen += 1
        if args.json:
            try:
                line = msg.data.decode()
            except UnicodeDecodeError as exc:  # in a field this version skips unread
                print(f"parley: {msg.subject}: the payload is not valid UTF-8 ({exc}); shown "
                      "with U+FFFD", file=sys.stderr, flush=True)
                line = msg.data.decode(errors="replace")  # still one JSON line, not lost
            print(line, flush=True)
        else:
            print(f"{event.at:%H:%M:%S.%f}"[:-3] + f"  {event.org_id}  {event.aggregate_id}  "
                  f"{event.type:<26} {summarize(event)}", flush=True)
        if args.limit and seen >= args.limit:
            done.set()

    await bus.nc.subscribe(subject, cb=on_message)
    await bus.nc.flush()
    print(f"following {subject} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        await done.wait()
    finally:
        await bus.close()
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    import psycopg

    from parley.common.store import installed_projections, rebuild

    projections = installed_projections()
    if args.projection not in projections:
        print(f"parley: unknown projection {args.projection!r}; known: "
              f"{', '.join(sorted(projections))}", file=sys.stderr)
        return 2
    url = server_url(args.dir, "PARLEY_DATABASE_URL")
    await check_postgres(url)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        report = await rebuild(conn, projections[args.projection])
    rate = report.events / report.seconds if report.seconds else 0.0
    print(f"rebuilt {report.projection} from {report.events} events up to position "
          f"{report.position} in {report.seconds:.2f}s ({rate:,.0f} events/s)")
    return 0


def _schema(args: argparse.Namespace) -> int:
    exported = msgspec.json.format(msgspec.json.encode(schema.json_schema()), indent=2)
    if args.json:
        args.json.write_bytes(exported + b"\n")
    if args.markdown:
        args.markdown.write_text(schema.markdown())
    if not args.json and not args.markdown:
        sys.stdout.write(exported.decode() + "\n")
    return 0
