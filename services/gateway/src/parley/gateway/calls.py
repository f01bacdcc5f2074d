"""The ``carrier_calls`` map (carrier call id → our call) and once-only call milestones.

Carriers identify a call by their own id (Twilio's CallSid), and retry their webhooks; these
functions resolve that id synchronously and make each lifecycle event happen once: a milestone
row (or ``answered_at``) is claimed in the same transaction that publishes the event, so a
failed publish rolls the claim back and the carrier's retry tries again. The end
(``ended_at``) is claimed first and its event then goes through the call's outbox, after the
call's events still pending there (:mod:`.call_outboxes`). A call's end has one id
(:func:`end_event_id`), whoever publishes it: the orphan check's settling of an end claimed
long ago may publish it while the end's own outbox still does (retrying through an outage, or
the instances' clocks minutes apart), and JetStream (within its dedupe window) and the
recorder (past it: a ``duplicate`` dead letter) store it once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parley.common.bus import Bus
from parley.common.configuration import Agent, find_number, get_agent
from parley.common.events import CallEnded, CallFailed, CallRequested, Event, uuid7

from .call_outboxes import CallOutboxes

log = logging.getLogger(__name__)

_END_IDS = uuid.UUID("a737dd7c-3856-446e-856e-656c284b08a2")
_COLUMNS = ("carrier, carrier_call_id, call_id, org_id, agent_id, direction, from_number, "
            "to_number, created_at, answered_at, ended_at, end_reason")


class CarrierCall(msgspec.Struct, kw_only=True):
    """One call as the gateway knows it."""

    carrier: str
    carrier_call_id: str
    call_id: str
    org_id: str
    agent_id: str
    direction: str
    from_number: str = ""
    to_number: str = ""
    created_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str = ""

    @property
    def ended(self) -> bool:
        """True once call.ended or call.failed was emitted for it."""
        return self.ended_at is not None


def new_call_id() -> str:
    """``call_<uuid7 hex>``: time-ordered, and a valid subject token."""
    return f"call_{uuid7().hex}"


def _row(row: tuple[Any, ...] | None) -> CarrierCall | None:
    if row is None:
        return None
    return CarrierCall(**dict(zip(_COLUMNS.split(", "), row, strict=True)))


async def record_carrier_call(conn: AsyncConnection[Any], call: CarrierCall) -> tuple[
        CarrierCall, bool]:
    """Insert the mapping unless the carrier id (or our call id) is known; ``(row, created)``.

    Safe to call from both sides of a race (the outbound API after ``calls.create`` returns and
    a webhook that arrived first): whoever comes second gets the existing row back.
    """
    cursor = await conn.execute(
        "INSERT INTO carrier_calls (carrier, carrier_call_id, call_id, org_id, agent_id, "
        "direction, from_number, to_number) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        f"ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
        (call.carrier, call.carrier_call_id, call.call_id, call.org_id, call.agent_id,
         call.direction, call.from_number, call.to_number))
    created = _row(await cursor.fetchone())
    if created is not None:
        return created, True
    existing = (await find_by_carrier_id(conn, call.carrier, call.carrier_call_id)
                or await find_by_call_id(conn, call.call_id))
    if existing is None:  # pragma: no cover - a conflict means one of them exists
        raise LookupError(f"carrier call {call.carrier_call_id} vanished")
    return existing, False


async def find_by_carrier_id(conn: AsyncConnection[Any], carrier: str,
                             carrier_call_id: str) -> CarrierCall | None:
    """The call a carrier's id belongs to."""
    cursor = await conn.execute(
        f"SELECT {_COLUMNS} FROM carrier_calls WHERE carrier = %s AND carrier_call_id = %s",
        (carrier, carrier_call_id))
    return _row(await cursor.fetchone())


async def find_by_call_id(conn: AsyncConnection[Any], call_id: str) -> CarrierCall | None:
    """The call with our id."""
    cursor = await conn.execute(f"SELECT {_COLUMNS} FROM carrier_calls WHERE call_id = %s",
                                (call_id,))
    return _row(await cursor.fetchone())


async def count_milestones(conn: AsyncConnection[Any], call_id: str, prefix: str) -> int:
    """How many milestones of a call start with ``prefix`` (e.g. ``reconnect:``)."""
    cursor = await conn.execute(
        "SELECT count(*) FROM carrier_call_milestones WHERE call_id = %s AND milestone LIKE %s",
        (call_id, prefix.replace("%", r"\%").replace("_", r"\_") + "%"))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def claim_milestone(conn: AsyncConnection[Any], call_id: str, milestone: str) -> bool:
    """Record that a call reached ``milestone``; False if it already had."""
    cursor = await conn.execute(
        "INSERT INTO carrier_call_milestones (call_id, milestone) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING RETURNING 1", (call_id, milestone))
    return await cursor.fetchone() is not None


async def publish_once(pool: AsyncConnectionPool[Any], bus: Bus, call_id: str, milestone: str,
                       event: Event) -> bool:
    """Publish ``event`` unless ``milestone`` was already reached; True if published now."""
    async with pool.connection() as conn, conn.transaction():
        if not await claim_milestone(conn, call_id, milestone):
            return False
        await bus.publish(event)
    return True


async def publish_answered(pool: AsyncConnectionPool[Any], bus: Bus, call_id: str,
                           event: Event) -> bool:
    """Publish call.answered once per call, recording when; True if published now."""
    async with pool.connection() as conn, conn.transaction():
        cursor = await conn.execute(
            "UPDATE carrier_calls SET answered_at = %s WHERE call_id = %s "
            "AND answered_at IS NULL RETURNING 1", (event.at, call_id))
        if await cursor.fetchone() is None:
            return False
        await bus.publish(event)
    return True


async def publish_end(pool: AsyncConnectionPool[Any], outboxes: CallOutboxes,
                      event: CallEnded | CallFailed, *extra: Event) -> bool:
    """End the call once: claim ``ended_at``, then publish ``extra`` events and the end event.

    They go out through the call's outbox after the events it has pending (a NATS outage:
    retried, never stored before them), so a NATS failure does not raise here; an end given up
    unpublished gives its claim back (:mod:`.call_outboxes`). Returns False (publishing
    nothing) when the call had already ended or is unknown.
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "UPDATE carrier_calls SET ended_at = %s, end_reason = %s WHERE call_id = %s "
            "AND ended_at IS NULL RETURNING 1", (event.at, event.reason, event.call_id))
        if await cursor.fetchone() is None:
            return False
    outboxes.end(msgspec.structs.replace(event, id=end_event_id(event.call_id)), *extra)
    return True


def end_event_id(call_id: str) -> uuid.UUID:
    """The id of the call's end, call.ended or call.failed: one per call (see the module)."""
    return uuid.uuid5(_END_IDS, call_id)


def seconds_since(start: datetime | None, now: datetime) -> float:
    """Whole-call arithmetic for durations; 0 when the start is unknown."""
    return 0.0 if start is None else max(0.0, (now - start).total_seconds())


async def open_inbound_call(pool: AsyncConnectionPool[Any], bus: Bus, *, carrier: str,
                            carrier_call_id: str, to_number: str,
                            from_number: str) -> tuple[CarrierCall, Agent] | None:
    """Resolve org and agent from the called number and record the call (once).

    ``call.requested`` is published inside the insert's transaction, so a carrier's retry of the
    same webhook finds the row and publishes nothing; None when the number routes nowhere.
    """
    async with pool.connection() as conn:
        number = await find_number(conn, to_number)
        agent = None if number is None else await get_agent(conn, number.agent_id,
                                                            org_id=number.org_id)
        if number is None or agent is None:
            log.warning("%s call %s to %r: number not assigned to a live agent", carrier,
                        carrier_call_id, to_number)
            return None
        async with conn.transaction():
            call, created = await record_carrier_call(conn, CarrierCall(
                carrier=carrier, carrier_call_id=carrier_call_id, call_id=new_call_id(),
                org_id=number.org_id, agent_id=agent.agent_id, direction="inbound",
                from_number=from_number, to_number=number.number))
            if created:
                await bus.publish(CallRequested(
                    org_id=call.org_id, call_id=call.call_id, direction="inbound",
                    agent_id=call.agent_id, from_number=from_number, to_number=number.number,
                    carrier=carrier, carrier_call_id=carrier_call_id))  # type: ignore[arg-type]
    return call, agent
