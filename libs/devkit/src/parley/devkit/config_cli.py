"""``parley orgs|agents|numbers|keys add/list``: manage configuration until the dashboard exists.

Every change is written with its config event in one transaction (the outbox); afterwards the
pending events are published straight away when NATS is reachable, otherwise the gateway's
outbox relay publishes them when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from parley.common import configuration as cfg
from parley.devkit.events_cli import check_postgres, server_url
from parley.devkit.local_infra import read_env_file

Action = Callable[[psycopg.AsyncConnection[Any], argparse.Namespace], Awaitable[int]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``orgs``, ``agents``, ``numbers`` and ``keys``."""
    orgs = _group(subparsers, "orgs", "tenants")
    add = _command(orgs, "add", "create an org", _add_org)
    add.add_argument("org_id")
    add.add_argument("name")
    _command(orgs, "list", "list orgs", _list_orgs)

    agents = _group(subparsers, "agents", "AI phone agents")
    add = _command(agents, "add", "create an agent", _add_agent)
    add.add_argument("org_id")
    add.add_argument("name")
    add.add_argument("--id", dest="agent_id")
    for field in ("prompt", "greeting", "voice", "language", "pipeline", "interruption-mode",
                  "interruption-sensitivity", "machine-policy", "voicemail-message",
                  "idle-prompt", "idle-goodbye"):
        add.add_argument(f"--{field}")
    add.add_argument("--max-duration-s", type=int)
    add.add_argument("--filler-after-ms", type=int, help="say a filler when the reply has not "
                     "begun this long into the turn, and again after as long (0: never)")
    add.add_argument("--transfer-number", action="append", dest="transfer_numbers",
                     metavar="E164", help="a number the agent may transfer callers to "
                     "(repeatable; without any, the agent cannot transfer)")
    add.add_argument("--callback-prefix", action="append", dest="callback_number_prefixes",
                     metavar="E164_PREFIX", help="numbers starting with it may be called back "
                     "besides the caller's own (repeatable, e.g. +1415; '+' allows any)")
    add.add_argument("--settings", help="JSON object of any AgentSettings fields")
    listing = _command(agents, "list", "list an org's agents", _list_agents)
    listing.add_argument("org_id")

    numbers = _group(subparsers, "numbers", "phone numbers")
    add = _command(numbers, "add", "route a number to an agent", _add_number)
    add.add_argument("org_id")
    add.add_argument("number", help="E.164, e.g. +14155550100")
    add.add_argument("agent_id")
    add.add_argument("--carrier", choices=("twilio", "plivo"), default="twilio")
    listing = _command(numbers, "list", "list an org's numbers", _list_numbers)
    listing.add_argument("org_id")

    keys = _group(subparsers, "keys", "API keys")
    add = _command(keys, "add", "issue an API key (shown once)", _add_key)
    add.add_argument("org_id")
    add.add_argument("--name", default="")
    add.add_argument("--scope", action="append", dest="scopes")


def _group(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
           what: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    parser = subparsers.add_parser(name, help=f"manage {what}")
    parser.add_argument("--dir", type=Path, default=Path(".parley"))
    return parser.add_subparsers(title=f"{name} commands", metavar="COMMAND", required=True)


def _command(group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
             action: Action) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_)
    parser.set_defaults(handler=lambda args: asyncio.run(_run(action, args)))
    return parser


async def _run(action: Action, args: argparse.Namespace) -> int:
    from parley.common.store import apply_migrations

    url = server_url(args.dir, "PARLEY_DATABASE_URL")
    await check_postgres(url)
    await apply_migrations(url)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        try:
            code = await action(conn, args)
        except cfg.ConfigurationError as exc:
            print(f"parley: {exc}", file=sys.stderr)
            return 1
        await _publish_outbox(conn, args.dir)
    return code


async def _publish_outbox(conn: psycopg.AsyncConnection[Any], root: Path) -> None:
    nats_url = os.environ.get("PARLEY_NATS_URL") or read_env_file(root).get("PARLEY_NATS_URL")
    if not nats_url:
        return
    from parley.common.bus import Bus

    try:
        bus = await asyncio.wait_for(Bus.connect(nats_url, name="parley-cli",
                                                 max_reconnect_attempts=0), 2)
    except (OSError, TimeoutError, Exception):  # noqa: BLE001 - NATS down: the relay catches up
        print("(config events stay in the outbox until the gateway publishes them)",
              file=sys.stderr)
        return
    try:
        await bus.ensure_streams()
        await cfg.OutboxRelay(bus, conn).publish_pending()
    finally:
        await bus.close()


def _show(value: Any) -> None:
    print(msgspec.json.encode(value).decode())


async def _add_org(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    _show(await cfg.create_org(conn, args.org_id, args.name, actor="cli"))
    return 0


async def _list_orgs(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    for org in await cfg.list_orgs(conn):
        print(f"{org.org_id:<20} {org.name}")
    return 0


async def _add_agent(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    try:
        values = msgspec.json.decode(args.settings or "{}", type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise cfg.ConfigurationError(f"--settings is not a JSON object: {exc}") from exc
    for field in cfg.AgentSettings.__struct_fields__:
        given = getattr(args, field, None)
        if given is not None:
            values[field] = given
    try:
        settings = msgspec.convert(values, cfg.AgentSettings)
    except msgspec.ValidationError as exc:
        raise cfg.ConfigurationError(f"invalid agent settings: {exc}") from exc
    _show(await cfg.create_agent(conn, args.org_id, args.name, settings,
                                 agent_id=args.agent_id, actor="cli"))
    return 0


async def _list_agents(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    for agent in await cfg.list_agents(conn, args.org_id):
        s = agent.settings
        print(f"{agent.agent_id:<20} {agent.name:<24} {s.pipeline:<10} {s.language:<6} "
              f"max {s.max_duration_s}s")
    return 0


async def _add_number(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    _show(await cfg.assign_number(conn, args.org_id, args.number, args.agent_id,
                                  carrier=args.carrier, actor="cli"))
    return 0


async def _list_numbers(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    for number in await cfg.list_numbers(conn, args.org_id):
        print(f"{number.number:<16} {number.carrier:<7} {number.agent_id}")
    return 0


async def _add_key(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    key, token = await cfg.create_api_key(conn, args.org_id, name=args.name, scopes=args.scopes,
                                          actor="cli")
    print(f"key {key.key_id} for {key.org_id} (scopes: {', '.join(key.scopes)})", file=sys.stderr)
    print("this is the only time the secret is shown:", file=sys.stderr)
    print(token)
    return 0
