"""Real servers for the benchmarks: nats-server and Postgres from the installed packages.

Started on demand on free loopback ports in temp dirs directly under /tmp (the Postgres user must
be able to reach its data dir; a private temp tree would lock it out), and all stopped and removed
by :meth:`Servers.close`, whatever happened.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nats
import psycopg

from parley.common.bus import Bus
from parley.common.store import apply_migrations
from parley.devkit.infra import NatsServer, PostgresServer

TEMPLATE_DB = "bench_template"


class Servers:
    """One nats-server and up to two Postgres clusters (fsync on / off), started lazily."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self._log = log
        self._nats: NatsServer | None = None
        self._postgres: dict[bool, PostgresServer] = {}
        self._roots: list[Path] = []
        self._database_numbers = itertools.count(1)

    def nats(self) -> NatsServer:
        """The JetStream server (started on first use)."""
        if self._nats is None:
            root = self._temp_root("parley-bench-nats-")
            self._nats = NatsServer(root).start()
            self._log(f"  nats-server on {self._nats.url} (store {root})")
        return self._nats

    async def clean_bus(self, name: str) -> Bus:
        """A connected Bus on a server whose streams were just deleted and recreated.

        Benchmarks share one server; starting from an empty EVENTS stream keeps stream positions
        equal to the events this benchmark published.
        """
        url = self.nats().url
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                await js.delete_stream(info.config.name or "")
        finally:
            await nc.close()
        bus = await Bus.connect(url, name=name)
        await bus.ensure_streams()
        return bus

    async def postgres(self, *, fsync: bool) -> PostgresServer:
        """A Postgres cluster with a migrated template database (started on first use)."""
        if fsync not in self._postgres:
            root = self._temp_root(f"parley-bench-pg-{'fsync' if fsync else 'nofsync'}-")
            server = PostgresServer(root, fsync=fsync)
            self._postgres[fsync] = server  # registered before start, so close() stops it
            server.start()
            admin = _database_url(server, "postgres")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
            await apply_migrations(_database_url(server, TEMPLATE_DB))
            self._log(f"  postgres (fsync={'on' if fsync else 'off'}) on port {server.port} "
                      f"(data {server.data_dir})")
        return self._postgres[fsync]

    async def fresh_database(self, *, fsync: bool) -> str:
        """URL of a new, migrated, empty database."""
        server = await self.postgres(fsync=fsync)
        name = f"bench_{next(self._database_numbers)}"
        with psycopg.connect(_database_url(server, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        return _database_url(server, name)

    def close(self) -> None:
        """Stop every server started here and remove its files."""
        for server in self._postgres.values():
            server.stop()
        if self._nats is not None:
            self._nats.stop()
        for root in self._roots:
            shutil.rmtree(root, ignore_errors=True)
        self._postgres.clear()
        self._nats = None
        self._roots.clear()

    def _temp_root(self, prefix: str) -> Path:
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self._roots.append(root)
        return root


def _database_url(server: PostgresServer, name: str) -> str:
    return server.url.rsplit("/", 1)[0] + "/" + name
