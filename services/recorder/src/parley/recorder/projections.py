"""The read models the recorder keeps in the same transaction as the events: calls, audit_log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from parley.common import events as ev

from .domain.call_state import CallState, evolve

_CALL_COLUMNS = tuple(CallState.__struct_fields__)

# Who-did-what: configuration, security, approvals and call lifecycle milestones.
AUDITED_TYPES = frozenset({
    "agent.created", "agent.updated", "agent.deleted", "api_key.created", "api_key.revoked",
    "number.assigned", "knowledge.ingested", "security.signature_rejected", "tool.approved",
    "tool.denied", "call.requested", "call.transferred", "call.ended", "call.failed",
    "quota.exceeded", "webhook.failed",
})

_ACTOR_FIELDS = ("actor", "approved_by", "denied_by")


class CallsProjection:
    """``calls``: one row per call with its state, parties, timings and outcome."""

    name = "calls"
    tables = ("calls",)

    async def apply(self, conn: AsyncConnection[Any], tables: Mapping[str, str],
                    batch: Sequence[tuple[int, ev.Event]]) -> None:
        """Fold the batch per call in memory, then write each touched call once."""
        call_events = [(p, e) for p, e in batch if isinstance(e, ev.CallEvent)]
        if not call_events:
            return
        table = sql.Identifier(tables["calls"])
        ids = list({e.aggregate_id for _, e in call_events})
        cursor = await conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE call_id = ANY(%s)").format(
                sql.SQL(", ").join(map(sql.Identifier, _CALL_COLUMNS)), table), (ids,))
        states: dict[str, CallState | None] = {
            row[0]: CallState(**dict(zip(_CALL_COLUMNS, row, strict=True)))
            for row in await cursor.fetchall()}
        for position, event in call_events:
            states[event.aggregate_id] = evolve(states.get(event.aggregate_id), position, event)
        upsert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (call_id) DO UPDATE SET {}")
        query = upsert.format(
            table, sql.SQL(", ").join(map(sql.Identifier, _CALL_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(_CALL_COLUMNS)),
            sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c))
                               for c in _CALL_COLUMNS[1:]))
        async with conn.cursor() as cur:
            await cur.executemany(query, [msgspec.structs.astuple(state)
                                          for state in states.values() if state is not None])


class AuditLogProjection:
    """``audit_log``: the trail of configuration changes, security refusals and approvals."""

    name = "audit_log"
    tables = ("audit_log",)

    async def apply(self, conn: AsyncConnection[Any], tables: Mapping[str, str],
                    batch: Sequence[tuple[int, ev.Event]]) -> None:
        """Insert one row per audited event."""
        rows = []
        for position, event in batch:
            if event.type not in AUDITED_TYPES:
                continue
            detail = ev.to_builtins(event)
            actor = next((str(detail[f]) for f in _ACTOR_FIELDS if detail.get(f)), "")
            rows.append((position, event.org_id, event.at, event.type, event.aggregate,
                         event.aggregate_id, actor, Jsonb(detail)))
        if not rows:
            return
        query = sql.SQL("INSERT INTO {} (position, org_id, at, type, aggregate, aggregate_id, "
                        "actor, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(
            sql.Identifier(tables["audit_log"]))
        async with conn.cursor() as cur:
            await cur.executemany(query, rows)
