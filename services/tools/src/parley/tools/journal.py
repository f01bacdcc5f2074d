"""The journal of tool calls: one row per tool call, and the events it emits (an outbox).

Every state change and the event that reports it are written in one transaction; the event is
published after commit (:func:`publish_pending`) and, should that fail, again by the sweep —
``Nats-Msg-Id`` is the event id, so publishing twice is harmless. An event that can never be
published (NATS refuses it) is set aside with the reason, so it holds back no other tool call.
The row is what makes a redelivered ``tool.requested`` a no-op, what an approval resumes from
after a restart, and what the approval API and the timeout sweep race on (``SELECT … FOR
UPDATE``: one decision wins). A call waiting for approval keeps the fingerprint of its tool's
definition as it was when the human was asked (``tool_fingerprint``), which the approved call
is checked against before it runs.

States: ``awaiting_approval`` → ``approved`` → ``running`` → ``completed`` | ``failed``; and
``awaiting_approval`` → ``denied``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from parley.common.bus import Bus
from parley.common.configuration.outbox import UNPUBLISHABLE
from parley.common.events import (
    Event,
    ToolApprovalRequested,
    ToolApproved,
    ToolDenied,
    ToolFailed,
    ToolRequested,
    decode,
    encode,
)

from .outcomes import without_nul

log = logging.getLogger(__name__)

State = Literal["awaiting_approval", "approved", "running", "completed", "failed", "denied"]
Decision = Literal["decided", "repeated", "not_found", "already_decided", "expired"]
TIMEOUT = "timeout"  # who denied a call no one decided on before its deadline
APPROVED_STALE_S = 300.0  # an approved call not started by then: its decision was lost
NEVER_STARTED = ("it was approved, but the tools service could not start it, so it did not "
                 "run; call it again if it is still wanted")
INTERRUPTED = ("the tools service stopped while this tool was running; it may or may not have "
               "taken effect — check before trying again")

_COLUMNS = "org_id, call_id, tool_call_id, turn_id, name, arguments, request_event_id"


def request_of(row: Any) -> ToolRequested:
    """Rebuild the original request from a journal row (columns ``_COLUMNS``)."""
    return ToolRequested(id=row[6], org_id=row[0], call_id=row[1], tool_call_id=row[2],
                         turn_id=row[3], name=row[4], arguments=row[5])


async def open_call(conn: AsyncConnection[Any], request: ToolRequested, agent_id: str,
                    state: State, *, event: Event | None = None, expires_in_s: float = 0.0,
                    lease_s: float = 0.0, tool_fingerprint: str | None = None) -> State | None:
    """Journal a new tool call (with its first event); the existing state if already known.

    A call that waits for approval is given its tool's ``tool_fingerprint`` (see
    :func:`start_approved`).
    """
    async with conn.transaction():
        cursor = await conn.execute(
            "INSERT INTO tool_calls (org_id, call_id, tool_call_id, turn_id, name, arguments, "
            "request_event_id, agent_id, state, expires_at, lease_until, tool_fingerprint) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now() + %s, now() + %s, %s) "
            "ON CONFLICT (call_id, tool_call_id) DO NOTHING RETURNING state",
            (request.org_id, request.call_id, request.tool_call_id, request.turn_id,
             request.name, Jsonb(without_nul(request.arguments)), request.id, agent_id, state,
             timedelta(seconds=expires_in_s), timedelta(seconds=lease_s), tool_fingerprint))
        if await cursor.fetchone() is None:
            cursor = await conn.execute(
                "SELECT state FROM tool_calls WHERE call_id = %s AND tool_call_id = %s",
                (request.call_id, request.tool_call_id))
            row = await cursor.fetchone()
            return row[0] if row else "failed"
        if event is not None:
            await _record(conn, request.call_id, request.tool_call_id, event)
    return None


async def finish(conn: AsyncConnection[Any], request: ToolRequested, event: Event) -> bool:
    """Move a running call to completed/failed with its outcome event; False if not running."""
    state = "completed" if event.type == "tool.completed" else "failed"
    async with conn.transaction():
        cursor = await conn.execute(
            "UPDATE tool_calls SET state = %s, lease_until = NULL, updated_at = now() "
            "WHERE call_id = %s AND tool_call_id = %s AND state = 'running' RETURNING 1",
            (state, request.call_id, request.tool_call_id))
        if await cursor.fetchone() is None:
            return False
        await _record(conn, request.call_id, request.tool_call_id, event)
    return True


async def decide(conn: AsyncConnection[Any], org_id: str, tool_call_id: str, *, approve: bool,
                 by: str, reason: str = "") -> tuple[Decision, Event | None]:
    """A human's decision on an org's waiting tool call (the approval API's one write).

    The same decision again (a client that never got the first answer asks again) is
    ``"repeated"`` with the event that recorded it, and writes nothing; the opposite one, or any
    on a call that needed no approval, is ``"already_decided"``; any after the deadline denied
    the call is ``"expired"``.
    """
    async with conn.transaction():
        cursor = await conn.execute(
            "SELECT call_id, state, expires_at <= now(), decided_by FROM tool_calls "
            "WHERE tool_call_id = %s "
            "AND org_id = %s ORDER BY (state = 'awaiting_approval') DESC, created_at DESC "
            "LIMIT 1 FOR UPDATE", (tool_call_id, org_id))
        row = await cursor.fetchone()
        if row is None:
            return "not_found", None
        call_id, state, expired, decided_by = row
        if state != "awaiting_approval":
            return await _earlier(conn, call_id, tool_call_id, approve, state, decided_by)
        if expired:
            return "expired", None  # the sweep denies it with denied_by="timeout"
        event: Event = (
            ToolApproved(org_id=org_id, call_id=call_id, tool_call_id=tool_call_id,
                         approved_by=by) if approve else
            ToolDenied(org_id=org_id, call_id=call_id, tool_call_id=tool_call_id,
                       denied_by=by, reason=reason))
        await _set_decision(conn, call_id, tool_call_id, approve, by)
        await _record(conn, call_id, tool_call_id, event)
    return "decided", event


async def _earlier(conn: AsyncConnection[Any], call_id: str, tool_call_id: str, approve: bool,
                  state: State, decided_by: str | None) -> tuple[Decision, Event | None]:
    if decided_by == TIMEOUT:
        return "expired", None
    if decided_by is None or (state == "denied") == approve:
        return "already_decided", None
    cursor = await conn.execute(
        "SELECT payload FROM tool_call_events WHERE call_id = %s AND tool_call_id = %s "
        "AND type = %s ORDER BY created_at LIMIT 1",
        (call_id, tool_call_id, "tool.approved" if approve else "tool.denied"))
    row = await cursor.fetchone()
    if row is None:  # decided by an event from elsewhere (accept_decision): nothing to repeat
        return "already_decided", None
    return "repeated", decode(bytes(row[0]))


async def decision_of(conn: AsyncConnection[Any], org_id: str,
                      tool_call_id: str) -> tuple[str, str] | None:
    """How an org's tool call was decided, ``("approved" | "denied", by whom)``, if it was."""
    cursor = await conn.execute(
        "SELECT state, decided_by FROM tool_calls WHERE tool_call_id = %s AND org_id = %s "
        "AND decided_by IS NOT NULL ORDER BY created_at DESC LIMIT 1", (tool_call_id, org_id))
    row = await cursor.fetchone()
    if row is None:
        return None
    return ("denied" if row[0] == "denied" else "approved"), row[1]


async def accept_decision(conn: AsyncConnection[Any], event: ToolApproved | ToolDenied) -> None:
    """Adopt a decision event emitted elsewhere (no-op when the call is no longer waiting)."""
    approve = isinstance(event, ToolApproved)
    by = event.approved_by if isinstance(event, ToolApproved) else event.denied_by
    async with conn.transaction():
        cursor = await conn.execute(
            "SELECT 1 FROM tool_calls WHERE call_id = %s AND tool_call_id = %s AND org_id = %s "
            "AND state = 'awaiting_approval' FOR UPDATE",
            (event.call_id, event.tool_call_id, event.org_id))
        if await cursor.fetchone() is not None:
            await _set_decision(conn, event.call_id, event.tool_call_id, approve, by)


async def start_approved(conn: AsyncConnection[Any], call_id: str, tool_call_id: str,
                         lease_s: float) -> tuple[ToolRequested, str, str | None] | None:
    """Claim an approved call for running, or None if not approved.

    Its request, agent and the fingerprint of the tool's definition the approval was asked for
    (None for a call journaled before fingerprints were kept): the caller runs it only under a
    definition with that fingerprint.
    """
    cursor = await conn.execute(
        "UPDATE tool_calls SET state = 'running', lease_until = now() + %s, updated_at = now() "
        f"WHERE call_id = %s AND tool_call_id = %s AND state = 'approved' RETURNING {_COLUMNS}, "
        "agent_id, tool_fingerprint", (timedelta(seconds=lease_s), call_id, tool_call_id))
    row = await cursor.fetchone()
    return None if row is None else (request_of(row), row[7], row[8])


async def unclaim(conn: AsyncConnection[Any], call_id: str, tool_call_id: str) -> None:
    """Give back a claim taken by :func:`start_approved` whose tool was not started."""
    await conn.execute(
        "UPDATE tool_calls SET state = 'approved', lease_until = NULL, updated_at = now() "
        "WHERE call_id = %s AND tool_call_id = %s AND state = 'running'",
        (call_id, tool_call_id))


async def extend_lease(conn: AsyncConnection[Any], call_id: str, tool_call_id: str,
                       lease_s: float) -> None:
    """Give a running call until ``lease_s`` from now before the sweep fails it."""
    await conn.execute(
        "UPDATE tool_calls SET lease_until = now() + %s, updated_at = now() "
        "WHERE call_id = %s AND tool_call_id = %s AND state = 'running'",
        (timedelta(seconds=lease_s), call_id, tool_call_id))


async def expire(conn: AsyncConnection[Any], *, limit: int = 100,
                 approved_stale_s: float = APPROVED_STALE_S) -> int:
    """Deny overdue approvals, fail runs whose lease ran out and approved calls never started.

    Returns how many.

    An approved call is started by the ``tool.approved`` consumer; if that message was
    dead-lettered (a database outage through all its deliveries), nothing else would start it,
    and the turn would wait for an outcome for ever. It never ran, so it fails saying so.
    """
    count = 0
    async with conn.transaction():
        cursor = await conn.execute(
            f"SELECT {_COLUMNS}, state FROM tool_calls WHERE (state = 'awaiting_approval' AND "
            "expires_at <= now()) OR (state = 'running' AND lease_until <= now()) "
            "OR (state = 'approved' AND updated_at <= now() - %s) "
            "LIMIT %s FOR UPDATE SKIP LOCKED", (timedelta(seconds=approved_stale_s), limit))
        for row in await cursor.fetchall():
            request = request_of(row)
            event: Event
            if row[7] == "awaiting_approval":
                event = ToolDenied(org_id=request.org_id, call_id=request.call_id,
                                   tool_call_id=request.tool_call_id, denied_by=TIMEOUT,
                                   reason="no decision before the approval deadline",
                                   causation_id=request.id)
                new_state = "denied"
            elif row[7] == "approved":
                event = ToolFailed(org_id=request.org_id, call_id=request.call_id,
                                   tool_call_id=request.tool_call_id, name=request.name,
                                   error=NEVER_STARTED, retryable=True, causation_id=request.id)
                new_state = "failed"
            else:
                event = ToolFailed(org_id=request.org_id, call_id=request.call_id,
                                   tool_call_id=request.tool_call_id, name=request.name,
                                   error=INTERRUPTED, causation_id=request.id)
                new_state = "failed"
            await conn.execute(
                "UPDATE tool_calls SET state = %s, decided_by = CASE WHEN %s = 'denied' "
                "THEN %s ELSE decided_by END, lease_until = NULL, updated_at = now() "
                "WHERE call_id = %s AND tool_call_id = %s",
                (new_state, new_state, TIMEOUT, request.call_id, request.tool_call_id))
            await _record(conn, request.call_id, request.tool_call_id, event)
            count += 1
    return count


async def publish_pending(conn: AsyncConnection[Any], bus: Bus, *, call_id: str | None = None,
                          tool_call_id: str | None = None, older_than_s: float = 0.0,
                          limit: int = 500) -> int:
    """Publish journaled events not yet published (of one tool call, or all); how many.

    An event that can never be published is logged and marked failed (``failed_at``,
    ``failure``); the events after it are published all the same.
    """
    query = ("SELECT event_id, payload FROM tool_call_events WHERE published_at IS NULL "
             "AND failed_at IS NULL AND created_at <= now() - %s")
    params: list[Any] = [timedelta(seconds=older_than_s)]
    if call_id is not None:
        query += " AND call_id = %s AND tool_call_id = %s"
        params += [call_id, tool_call_id]
    cursor = await conn.execute(query + " ORDER BY created_at LIMIT %s", [*params, limit])
    published = 0
    for event_id, payload in await cursor.fetchall():
        try:
            await bus.publish(decode(bytes(payload)))
        except UNPUBLISHABLE as exc:
            log.error("tool call event %s can never be published, set aside: %r", event_id, exc)
            await conn.execute("UPDATE tool_call_events SET failed_at = now(), failure = %s "
                               "WHERE event_id = %s", (repr(exc), event_id))
            continue
        await conn.execute("UPDATE tool_call_events SET published_at = now() "
                           "WHERE event_id = %s", (event_id,))
        published += 1
    return published


async def state_of(conn: AsyncConnection[Any], call_id: str, tool_call_id: str) -> State | None:
    """A tool call's state, or None if the journal does not know it."""
    cursor = await conn.execute(
        "SELECT state FROM tool_calls WHERE call_id = %s AND tool_call_id = %s",
        (call_id, tool_call_id))
    row = await cursor.fetchone()
    return None if row is None else row[0]


def approval_request(request: ToolRequested, expires_in_s: float) -> ToolApprovalRequested:
    """The event asking a human to decide on ``request``."""
    return ToolApprovalRequested(org_id=request.org_id, call_id=request.call_id,
                                 causation_id=request.id, tool_call_id=request.tool_call_id,
                                 name=request.name, arguments=request.arguments,
                                 expires_in_s=expires_in_s)


async def _set_decision(conn: AsyncConnection[Any], call_id: str, tool_call_id: str,
                        approve: bool, by: str) -> None:
    await conn.execute(
        "UPDATE tool_calls SET state = %s, decided_by = %s, updated_at = now() "
        "WHERE call_id = %s AND tool_call_id = %s",
        ("approved" if approve else "denied", by, call_id, tool_call_id))


async def _record(conn: AsyncConnection[Any], call_id: str, tool_call_id: str,
                  event: Event) -> None:
    await conn.execute(
        "INSERT INTO tool_call_events (event_id, call_id, tool_call_id, type, payload) "
        "VALUES (%s, %s, %s, %s, %s)", (event.id, call_id, tool_call_id, event.type,
                                         encode(event)))

