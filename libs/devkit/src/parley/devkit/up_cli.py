"""``parley up``: the whole platform on one machine.

Ensures the embedded nats-server and Postgres are running (see ``local_infra``), runs the
``prepare`` hook (migrations, streams), then supervises every service as ``python -m
parley.<name>`` until Ctrl-C or SIGTERM. Servers this command started are stopped on the way out;
servers that were already running (``parley infra up``) or are external are left alone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from parley.devkit.infra import free_port
from parley.devkit.infra_cli import add_dir_argument, report
from parley.devkit.local_infra import (
    DATABASE_URL_VAR,
    NATS_URL_VAR,
    ensure_infra,
    format_env,
    read_env_file,
    write_env_file,
)
from parley.devkit.supervisor import PrepareHook, Supervisor, serve

SERVICES = ("gateway", "media", "brain", "tools", "postcall", "billing", "recorder")


async def prepare_platform(env: Mapping[str, str]) -> None:
    """Get shared state ready before any service starts: apply the database migrations."""
    database_url = env.get(DATABASE_URL_VAR)
    if not database_url:
        report(f"migrations skipped: {DATABASE_URL_VAR} is not set")
        return
    try:
        from parley.common.store.migrations import apply_migrations
    except ModuleNotFoundError as missing:
        if not (missing.name or "").startswith("parley.common.store"):
            raise
        report("migrations skipped: parley.common.store.migrations does not exist yet")
        return
    applied = await apply_migrations(database_url)
    report(f"migrations applied: {', '.join(applied)}" if applied else "database schema up to date")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up`` to the ``parley`` parser."""
    up = subparsers.add_parser("up", help="start infrastructure and supervise every service")
    add_dir_argument(up)
    up.add_argument("--only", type=service_list, default=SERVICES, metavar="SVC[,SVC...]",
                    help=f"services to run (default: all of {','.join(SERVICES)})")
    up.add_argument("--no-infra", action="store_true",
                    help="start no servers; take the URLs from the environment or .parley/env")
    up.set_defaults(handler=run_up)


def service_list(text: str) -> tuple[str, ...]:
    """Parse ``--only``: comma-separated names, each one of ``SERVICES``."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SERVICES]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        choices = ", ".join(SERVICES)
        raise argparse.ArgumentTypeError(f"unknown service {given}; choose from {choices}")
    return names


def service_commands(names: Iterable[str]) -> dict[str, list[str]]:
    """The argv that runs each service with this interpreter."""
    return {name: [sys.executable, "-m", f"parley.{name}"] for name in names}


def run_up(args: argparse.Namespace, *, prepare: PrepareHook = prepare_platform) -> int:
    """Run ``parley up``; ``prepare`` is handed to the supervisor, which awaits it first."""
    session = None
    recorded = read_env_file(args.dir)
    if args.no_infra:
        urls = urls_without_infra(args.dir, os.environ)
    else:
        session = ensure_infra(args.dir, environ=os.environ, report=report, detach=False)
        urls = session.urls
    env = {**urls, **local_telephony(recorded, os.environ)}
    if not args.no_infra:
        write_env_file(args.dir, env)  # what `parley call` reads
    print(format_env(env), end="", flush=True)
    supervisor = Supervisor(service_commands(args.only), env=env, prepare=prepare)
    try:
        return serve(supervisor)
    finally:
        if session is not None:
            session.stop_started(report)


def local_telephony(recorded: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """Twilio settings for talking to a local gateway with ``parley call``.

    Without a Twilio account in the environment, the gateway checks signatures with a local
    auth token (kept across runs in ``.parley/env``) and dials outbound calls through the
    Twilio emulator that ``parley call --outbound`` serves on a loopback port. Variables set in
    the environment win; a real ``PARLEY_TWILIO_AUTH_TOKEN`` turns the emulator off.
    """
    gateway_url = f"http://127.0.0.1:{environ.get('PARLEY_HTTP_PORT', '8080')}"
    where = {"PARLEY_GATEWAY_URL": gateway_url}
    if not environ.get("PARLEY_PUBLIC_BASE_URL"):  # what the gateway signs and puts in TwiML
        where["PARLEY_PUBLIC_BASE_URL"] = gateway_url
    env = {
        **where,
        "PARLEY_TWILIO_ACCOUNT_SID": recorded.get("PARLEY_TWILIO_ACCOUNT_SID")
        or "AC" + secrets.token_hex(16),
        "PARLEY_TWILIO_AUTH_TOKEN": recorded.get("PARLEY_TWILIO_AUTH_TOKEN")
        or secrets.token_hex(16),
        "PARLEY_TWILIO_API_BASE_URL": recorded.get("PARLEY_TWILIO_API_BASE_URL")
        or f"http://127.0.0.1:{free_port()}",
    }
    if environ.get("PARLEY_TWILIO_AUTH_TOKEN"):  # a real account: no emulator, no local secrets
        return where
    return env


def urls_without_infra(root: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """Server URLs for ``--no-infra``: from the environment, else from ``.parley/env``."""
    recorded = read_env_file(root)
    urls = {}
    for name in (NATS_URL_VAR, DATABASE_URL_VAR):
        url = environ.get(name) or recorded.get(name)
        if url:
            urls[name] = url
        else:
            report(f"{name} is not set and not in {root}/env; services will use their defaults")
    return urls
