"""``parley infra up|down|status``: the embedded nats-server and Postgres under ``.parley/``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import psycopg

from parley.devkit.local_infra import (
    ENV_FILE_NAME,
    ensure_infra,
    format_env,
    infra_status,
    stop_infra,
)

DEFAULT_DIR = Path(".parley")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``infra`` and its subcommands to the ``parley`` parser."""
    infra = subparsers.add_parser("infra", help="embedded nats-server and Postgres under .parley/")
    commands = infra.add_subparsers(dest="infra_command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the servers detached (no-op when running)")
    add_dir_argument(up)
    up.add_argument("--nats-port", type=int, default=0, metavar="N",
                    help="client port for nats-server (default: last used if free, else any)")
    up.add_argument("--pg-port", type=int, default=0, metavar="N",
                    help="port for Postgres (default: last used if free, else any)")
    up.set_defaults(handler=infra_up)

    down = commands.add_parser("down", help="stop the servers")
    add_dir_argument(down)
    down.set_defaults(handler=infra_down)

    status = commands.add_parser("status", help="show each server; exit 1 unless all are up")
    add_dir_argument(status)
    status.set_defaults(handler=infra_status_command)


def add_dir_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--dir`` option shared by every command that uses ``.parley/``."""
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="directory for server data, pids and the env file (default: .parley)")


def report(message: str) -> None:
    """Progress messages go to stderr, so stdout carries only the ``KEY=value`` lines."""
    print(message, file=sys.stderr, flush=True)


def infra_up(args: argparse.Namespace) -> int:
    """Start the servers that are not running, write and print ``.parley/env``."""
    session = ensure_infra(args.dir, environ=os.environ, report=report, detach=True,
                           nats_port=args.nats_port, postgres_port=args.pg_port)
    from parley.devkit.up_cli import prepare_platform  # the schema, so config commands work

    try:
        asyncio.run(prepare_platform(session.urls))
    except psycopg.OperationalError as exc:  # an external database that is not up (yet)
        report(f"migrations not applied (database unreachable): {str(exc).strip()[:200]}")
    print(format_env(session.urls), end="", flush=True)
    env_file = args.dir / ENV_FILE_NAME
    report(f"written to {env_file}; load it with: set -a; . {env_file}; set +a")
    return 0


def infra_down(args: argparse.Namespace) -> int:
    """Stop the servers recorded in ``.parley/infra.json``."""
    stop_infra(args.dir, report)
    return 0


def infra_status_command(args: argparse.Namespace) -> int:
    """Print one line per server; 0 when all are up, else 1."""
    statuses = infra_status(args.dir, os.environ)
    for status in statuses:
        print(status.describe())
    return 0 if all(status.up for status in statuses) else 1
