"""SQL migrations, applied in order, each once, each in its own transaction.

Files are ``sql/NNN_name.sql`` in this package. Concurrent starters serialise on an advisory
lock, so two services booting together never apply the same migration twice.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7061726C6579  # "parley"


def migration_files() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every migration, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("sql").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(version), name, entry.read_text()))
    return sorted(found)


async def apply_migrations(conninfo: str) -> list[str]:
    """Bring the database schema up to date; returns the names of migrations applied now."""
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            cursor = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cursor.fetchall()}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name))
                log.info("applied migration %03d_%s", version, name)
                applied.append(f"{version:03d}_{name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied
