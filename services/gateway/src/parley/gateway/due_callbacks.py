"""Dialling the callbacks the ``schedule_callback`` built-in books (rows of ``tool_callbacks``).

The tools service only books them; placing outbound calls is the gateway's (carrier clients,
numbers, the org's call rate), so the gateway dials them when they are due. Every
``gateway_callback_interval_s`` each instance claims due ``pending`` rows with ``SELECT … FOR
UPDATE SKIP LOCKED`` and marks them ``dialing`` in that transaction, committed before it dials:
two instances never dial one callback. An instance that dies mid-dial leaves its row
``dialing``; after :data:`INTERRUPTED_AFTER_S` a round settles it without dialling again (the
carrier may have placed the call): ``placed`` if its call reached ``carrier_calls``, else
``failed``; the dialling instance, if it was only slow (a carrier answering after that), then
leaves the row as settled (:func:`_settle` changes only a ``dialing`` row). A row claimed but
not dialled goes back to ``pending`` (:func:`_release`): the rest of a batch when the gateway
stops or the database fails mid-batch, and one whose call.requested NATS did not take
(:class:`parley.gateway.outbound.NotDialled`).

A callback is dialled from the agent's number of the call it was booked on (the number the
caller reached, or the one the agent called from), as that call's agent, through
:func:`parley.gateway.outbound.place_outbound`; its call.requested carries ``metadata``
``callback_of`` (the call it was booked on) and ``tool_call_id``, and ``context``
``callback_note``, the note the model gave. It takes one of the org's calls from the rate
limiter like ``POST /v1/calls``; with none left it stays pending for a later round.

Outcomes, on the row: ``placed`` (``placed_call_id``); ``failed`` (``last_error``) when the
carrier refused the number itself, or nothing can call it any more (the call it was booked on,
that number or the agent gone), or it no longer passes schedule_callback's guard as the agent
is now (:func:`_check_guard`: the caller's own number or one of the agent's
``callback_number_prefixes``, narrowed since it was booked; at most 30 days after booking).
A dial the carrier never answered (``DialError.ambiguous``: a timeout, the connection lost once
the request was sent) is settled like an interrupted one and never dialled again, as the
carrier may have placed the call. Any other carrier failure (an
error answer, the carrier unconfigured) is tried again after ``gateway_callback_retry_s``, then
twice that, and fails after :data:`MAX_ATTEMPTS` attempts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web
from psycopg import AsyncConnection

from parley.common.configuration import Agent, PhoneNumber, find_number, get_agent
from parley.common.configuration.models import E164_PATTERN

from .api.dialing import CarrierUnavailable, DialError
from .calls import find_by_call_id, new_call_id
from .keys import CALL_RATE_LIMITER, CONFIG, METRICS, POOL
from .outbound import DialledNotRecorded, NotDialled, place_outbound, retried

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
BATCH = 10  # claimed per round; a full batch starts the next round at once
INTERRUPTED_AFTER_S = 120  # a dial takes at most the carrier REST client's timeout (10 s)

MAX_AHEAD = timedelta(days=30)  # as schedule_callback books them
_COLUMNS = ("id, org_id, call_id, tool_call_id, agent_id, number, note, attempts, callback_at, "
            "created_at")


class _Due(msgspec.Struct, kw_only=True):
    id: int
    org_id: str
    call_id: str
    tool_call_id: str
    agent_id: str
    number: str
    note: str
    attempts: int
    callback_at: datetime
    created_at: datetime
    placed_call_id: str = ""


class _Undiallable(Exception):
    """Nothing can place this callback any more."""


async def run(app: web.Application) -> None:
    """Place due callbacks every ``gateway_callback_interval_s``, until cancelled."""
    interval = app[CONFIG].gateway_callback_interval_s
    while True:
        try:
            while await place_due(app) == BATCH:
                pass
        except Exception:  # a database or bus outage: the next round tries again
            log.exception("due callbacks: the round failed")
        await asyncio.sleep(interval)


async def place_due(app: web.Application) -> int:
    """Dial the callbacks due now that this instance claims; how many it claimed."""
    claimed = await _claim(app)
    for index, due in enumerate(claimed):
        try:
            await _place(app, due)
        except BaseException:  # stopping (cancelled), or the database failed: the rest wait
            await _release(app, claimed[index + 1:])
            raise
    return len(claimed)


async def _claim(app: web.Application) -> list[_Due]:
    """Due callbacks, marked dialing; an org over its call rate waits for a later round.

    Its rows are left out and the rest looked at again, so an org with a backlog due first
    does not hold back another org's callbacks (each has its own bucket).
    """
    limiter = app[CALL_RATE_LIMITER]
    claimed: list[_Due] = []
    over_rate: list[str] = []
    async with app[POOL].connection() as conn, conn.transaction():
        await _settle_interrupted(conn)
        while len(claimed) < BATCH:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM tool_callbacks WHERE status = 'pending' "
                "AND coalesce(retry_at, callback_at) <= now() AND org_id <> ALL(%s) "
                "ORDER BY coalesce(retry_at, callback_at) LIMIT %s FOR UPDATE SKIP LOCKED",
                (over_rate, BATCH - len(claimed)))
            rows = await cursor.fetchall()
            went_over = False
            for row in rows:
                due = _Due(**dict(zip(_COLUMNS.split(", "), row, strict=True)))
                if due.org_id in over_rate:
                    continue
                if limiter.take(due.org_id):
                    over_rate.append(due.org_id)  # a later round
                    went_over = True
                    continue
                due.attempts += 1
                due.placed_call_id = new_call_id()
                await conn.execute(
                    "UPDATE tool_callbacks SET status = 'dialing', attempts = %s, "
                    "placed_call_id = %s, updated_at = now() WHERE id = %s",
                    (due.attempts, due.placed_call_id, due.id))
                claimed.append(due)
            if not went_over:  # all taken, or none left due
                break
    return claimed


async def _settle_interrupted(conn: AsyncConnection[Any]) -> None:
    """Rows an instance that died mid-dial left ``dialing``: never dialled again."""
    cursor = await conn.execute(
        "UPDATE tool_callbacks c SET status = CASE WHEN EXISTS (SELECT 1 FROM carrier_calls "
        "WHERE call_id = c.placed_call_id) THEN 'placed' ELSE 'failed' END, "
        "last_error = 'interrupted: the gateway dialling it stopped; not dialled again, as the "
        "carrier may have placed the call', updated_at = now() "
        "WHERE status = 'dialing' AND updated_at < now() - make_interval(secs => %s) "
        "RETURNING id, status", (INTERRUPTED_AFTER_S,))
    for callback_id, status in await cursor.fetchall():
        log.warning("callback %s: interrupted while dialling; %s", callback_id, status)


async def _place(app: web.Application, due: _Due) -> None:
    try:
        agent, number = await _origin(app, due)
    except _Undiallable as exc:
        app[CALL_RATE_LIMITER].give_back(due.org_id)  # nothing dialled: no call to charge
        await _settle(app, due, "failed", str(exc), placed_call_id="")
        return
    except BaseException:  # the database failed, or the gateway is stopping: not dialled
        await _release(app, [due])
        raise
    try:
        await place_outbound(app, call_id=due.placed_call_id, agent=agent, number=number,
                             to_number=due.number, context={"callback_note": due.note},
                             metadata={"callback_of": due.call_id,
                                       "tool_call_id": due.tool_call_id})
    except NotDialled as exc:  # NATS down: the carrier was not asked; a later round
        log.warning("callback %s: not dialled: %s", due.id, exc)
        await _release(app, [due])
    except DialledNotRecorded as exc:  # the carrier is dialling it, whatever the database said
        await _settle(app, due, "placed", str(exc))
    except (DialError, CarrierUnavailable) as exc:
        number_fault = isinstance(exc, DialError) and exc.caller_fault
        if isinstance(exc, DialError) and exc.ambiguous:  # never again, as if interrupted
            placed = await _reached_carrier(app, due)
            await _settle(app, due, "placed" if placed else "failed", (
                f"{exc}; not dialled again, as the carrier may have placed the call"))
        elif number_fault or due.attempts >= MAX_ATTEMPTS:
            await _settle(app, due, "failed", str(exc))
        else:
            await _settle(app, due, "pending", str(exc), retry_after_s=(
                app[CONFIG].gateway_callback_retry_s * 2 ** (due.attempts - 1)))
    except Exception:  # left dialing: the carrier may have it; settled as interrupted later
        log.exception("callback %s: placing call %s failed", due.id, due.placed_call_id)
    else:
        await _settle(app, due, "placed")


async def _reached_carrier(app: web.Application, due: _Due) -> bool:
    """Whether the call dialled for it is in ``carrier_calls`` (its webhooks came)."""
    async with app[POOL].connection() as conn:
        cursor = await conn.execute("SELECT 1 FROM carrier_calls WHERE call_id = %s",
                                    (due.placed_call_id,))
        return await cursor.fetchone() is not None


async def _release(app: web.Application, claimed: list[_Due]) -> None:
    """Claimed callbacks that were not dialled: pending again, the attempt not counted.

    Nor their calls against the org's rate: each gives back the token its claim took.
    """
    if not claimed:
        return
    for due in claimed:
        app[CALL_RATE_LIMITER].give_back(due.org_id)
    async with app[POOL].connection() as conn:
        await conn.execute(
            "UPDATE tool_callbacks SET status = 'pending', attempts = attempts - 1, "
            "updated_at = now() WHERE id = ANY(%s) AND status = 'dialing'",
            ([due.id for due in claimed],))


async def _origin(app: web.Application, due: _Due) -> tuple[Agent, PhoneNumber]:
    """The agent and number of the call the callback was booked on, as they are now."""
    async with app[POOL].connection() as conn:
        original = await find_by_call_id(conn, due.call_id)
        if original is None or original.org_id != due.org_id:
            raise _Undiallable(f"the call {due.call_id} it was booked on is unknown to the "
                               "gateway: no number to call from")
        own = original.to_number if original.direction == "inbound" else original.from_number
        number = await find_number(conn, own)
        agent = await get_agent(conn, due.agent_id or original.agent_id, org_id=due.org_id)
    if number is None or number.org_id != due.org_id:
        raise _Undiallable(f"{own}, the number of the call it was booked on, is no longer one "
                           "of the org's numbers")
    if agent is None:
        raise _Undiallable(f"the agent {due.agent_id or original.agent_id} no longer exists")
    _check_guard(due, agent, original.from_number if original.direction == "inbound"
                 else original.to_number)
    return agent, number


def _check_guard(due: _Due, agent: Agent, callers_own: str) -> None:
    """Raise :class:`_Undiallable` unless schedule_callback would book this callback now.

    Booking checked it, but the agent's ``callback_number_prefixes`` may have been narrowed
    since (callers talking it into numbers at the org's expense): what counts is the guard as
    it is when the org pays for the call.
    """
    if not re.match(E164_PATTERN, due.number):
        raise _Undiallable(f"{due.number!r} is not an E.164 number")
    if due.callback_at > due.created_at + MAX_AHEAD:
        raise _Undiallable(f"booked for {due.callback_at.isoformat()}, over "
                           f"{MAX_AHEAD.days} days after it was booked")
    prefixes = agent.settings.callback_number_prefixes
    if due.number == callers_own or any(due.number.startswith(p) for p in prefixes):
        return
    raise _Undiallable(
        f"callback to {due.number} not allowed for this agent any more: it can call back only "
        f"the caller's own number ({callers_own or 'unknown'})"
        + (f" or numbers starting {', '.join(prefixes)}" if prefixes else "")
        + " (its callback_number_prefixes changed after booking)")


async def _settle(app: web.Application, due: _Due, status: str, error: str = "", *,
                  placed_call_id: str | None = None, retry_after_s: float = 0.0) -> None:
    """Record the dial's outcome, unless a round already settled the row as interrupted.

    Tried again through a database outage (:func:`parley.gateway.outbound.retried`): a dial
    whose outcome is lost is settled as interrupted two minutes later, by then a guess. A try
    whose update was committed though its answer was lost leaves the row as this outcome, which
    the next try then takes as its own.
    """
    placed_call_id = due.placed_call_id if placed_call_id is None else placed_call_id
    error = error[:500]

    async def update(attempt: int) -> int:
        async with app[POOL].connection() as conn:
            cursor = await conn.execute(
                "UPDATE tool_callbacks SET status = %s, last_error = %s, placed_call_id = %s, "
                "retry_at = now() + make_interval(secs => %s), updated_at = now() "
                "WHERE id = %s AND (status = 'dialing' OR %s AND status = %s "
                "AND last_error = %s AND placed_call_id = %s)",
                (status, error, placed_call_id, retry_after_s, due.id,
                 attempt > 0, status, error, placed_call_id))
            return cursor.rowcount

    if await retried(update, f"callback {due.id}: recording {status}") == 0:
        log.warning("callback %s: settled as interrupted while dialling took over %d s; "
                    "its outcome (%s: %s) is not recorded", due.id, INTERRUPTED_AFTER_S,
                    status, error)
        return
    app[METRICS].counter("gateway_callbacks", "callbacks dialled when due, by outcome",
                         ["outcome"]).labels(status if status != "pending" else "retry").inc()
    if status == "placed":
        log.info("callback %s: call %s placed to %s", due.id, due.placed_call_id, due.number)
    else:
        log.warning("callback %s (attempt %d): %s: %s", due.id, due.attempts, status, error)
