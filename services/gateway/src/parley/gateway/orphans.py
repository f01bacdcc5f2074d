"""Calls no gateway instance holds: their gateway was killed mid-call (SIGKILL, OOM, a lost node).

Its sockets died with it, and nothing of it is left to end their calls: the carrier, its stream
gone, asks our reconnect URL (Twilio's ``<Connect action>``, Plivo's ``<Redirect>``), which
finds no instance if that gateway was the only one and it is still down, and then drops the
call; an inbound call has no status callback that reaches us then, so ``call.ended`` never came
and the call stayed live in the store for good (a chaos run: every call in progress when the
gateway was killed). A call back on a new stream has a socket again; one whose reconnect
failed has none.

So every instance looks every ``gateway_orphan_check_s`` at the answered calls not ended, of
both carriers: whether any instance holds the call's socket is whether any answers its ``ping``
command (no responders: none does). A call none holds in two rounds in a row (a stream
starting, or a DTMF redirect's next one, takes seconds), and on no new stream in between (each
stream's start is a ``stream:<id>`` milestone: an agent sending digits often is between streams
at many a round), is asked of its carrier through its REST API, as a dead socket's is: over →
``call.ended`` (``caller_hangup``, the carrier's duration); still up → hung up (REST), reason
``error``; unknown to the carrier (404) → ``call.ended``, reason ``error``. One whose transfer
the carrier took (a ``transferred:<to>`` milestone), its end not published then (NATS away), is
ended as transferred, not hung up: the caller is talking to the person now. Twilio is asked for
the call; Plivo for the live call, then for the ended call's record. Several instances may
decide the same call: ``call.ended`` is published once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiohttp import web
from nats.errors import NoRespondersError
from twilio.base.exceptions import TwilioRestException

from parley.common.bus import command_subject
from parley.common.events import CallEnded, CallTransferred

from .calls import publish_end, seconds_since
from .keys import BUS, CALL_OUTBOXES, CLOCK, CONFIG, POOL, TWILIO_REST
from .plivo.rest import PLIVO_REST, PlivoCalls
from .twilio.next_stream import ENDED_AT_TWILIO
from .twilio.rest import TwilioCalls

log = logging.getLogger(__name__)

BATCH = 1000  # calls read at once, oldest first
PING_TIMEOUT_S = 2.0  # a ping unanswered in time has a responder: the call is held


class AtCarrier(NamedTuple):
    """What the carrier says of a call: ``live`` None if it knows no such call (404)."""

    live: bool | None
    status: str = ""  # its word for the call, logged
    duration_s: float | None = None  # an ended call's


async def run(app: web.Application) -> None:
    """Look for calls no instance holds every ``gateway_orphan_check_s``, until cancelled."""
    interval = app[CONFIG].gateway_orphan_check_s
    unheld: dict[str, int] = {}  # calls no instance held in the last round → their streams
    while True:
        await asyncio.sleep(interval)
        try:
            unheld = await check(app, unheld)
        except Exception:  # a database or bus outage: the next round tries again
            log.exception("orphaned calls: the round failed")


async def check(app: web.Application, unheld_before: dict[str, int]) -> dict[str, int]:
    """One round: end the calls held neither now nor in the last round; those not held now.

    A call is ended only if no new stream started in between: the map is call → its streams.
    """
    unheld: dict[str, int] = {}
    after = (datetime.min.replace(tzinfo=UTC), "")  # the last call looked at
    while True:  # every live call, BATCH at a time: those answered later are orphaned too
        async with app[POOL].connection() as conn:
            cursor = await conn.execute(
                "SELECT c.call_id, carrier_call_id, org_id, answered_at, (SELECT count(*) FROM "
                "carrier_call_milestones m WHERE m.call_id = c.call_id AND m.milestone LIKE "
                "'stream:%%'), carrier, t.milestone, t.at FROM carrier_calls c "
                "LEFT JOIN LATERAL (SELECT milestone, at FROM carrier_call_milestones m "
                "WHERE m.call_id = c.call_id AND m.milestone LIKE 'transferred:%%' "
                "ORDER BY at LIMIT 1) t ON true "
                "WHERE carrier IN ('twilio', 'plivo') AND ended_at IS NULL "
                "AND answered_at IS NOT NULL AND (answered_at, c.call_id) > (%s, %s) "
                "ORDER BY answered_at, c.call_id LIMIT %s",
                (*after, BATCH))
            rows = await cursor.fetchall()
        await _look_at(app, rows, unheld_before, unheld)
        if len(rows) < BATCH:
            return unheld
        after = (rows[-1][3], rows[-1][0])


async def _look_at(app: web.Application, rows: list[Any], unheld_before: dict[str, int],
                   unheld: dict[str, int]) -> None:
    for (call_id, carrier_call_id, org_id, answered_at, streams, carrier, transferred,
         transferred_at) in rows:
        if await _held(app, call_id):
            continue
        unheld[call_id] = streams
        if unheld_before.get(call_id) != streams:
            continue
        try:
            if transferred is not None:
                await _end_transferred(app, call_id, org_id, transferred.removeprefix(
                    "transferred:"), transferred_at, answered_at)
            else:
                await _end(app, carrier, call_id, carrier_call_id, org_id,
                           seconds_since(answered_at, app[CLOCK]()))
        except Exception:  # the carrier or the bus failing: this call is asked about next round
            log.exception("call %s: no gateway holds it, and ending it failed", call_id)


async def _held(app: web.Application, call_id: str) -> bool:
    try:
        await app[BUS].nc.request(command_subject(call_id, "ping"), b"",
                                  timeout=PING_TIMEOUT_S)
    except NoRespondersError:
        return False
    except TimeoutError:
        pass
    return True


async def _end_transferred(app: web.Application, call_id: str, org_id: str, to: str,
                           transferred_at: datetime, answered_at: datetime) -> None:
    """A call whose transfer the carrier took, its end never published (NATS away then).

    The caller is with the person they were transferred to: not a call to hang up.
    """
    if await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
            org_id=org_id, call_id=call_id, reason="transferred",
            duration_s=seconds_since(answered_at, transferred_at)), CallTransferred(
            org_id=org_id, call_id=call_id, to_number=to, mode="cold")):
        log.warning("call %s: no gateway holds it, and it was transferred to %s: ended",
                    call_id, to)


async def _end(app: web.Application, carrier: str, call_id: str, carrier_call_id: str,
               org_id: str, duration_s: float) -> None:
    twilio, plivo = app[TWILIO_REST], app.get(PLIVO_REST)  # Plivo's: set up after this loop
    rest: TwilioCalls | PlivoCalls
    if carrier == "twilio" and twilio is not None:
        rest, at_carrier = twilio, await _ask_twilio(twilio, carrier_call_id)
    elif carrier == "plivo" and plivo is not None:
        rest, at_carrier = plivo, await _ask_plivo(plivo, carrier_call_id)
    else:
        return  # no REST client for the carrier: nothing to ask
    if at_carrier.live is None:
        # the carrier knows no such call (any more): nothing is up to hang up, nor says who
        # ended it
        if await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
                org_id=org_id, call_id=call_id, reason="error", duration_s=duration_s)):
            log.warning("call %s: no gateway holds it, and %s does not know it: ended",
                        call_id, carrier)
        return
    if not at_carrier.live:
        duration = at_carrier.duration_s if at_carrier.duration_s is not None else duration_s
        if await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
                org_id=org_id, call_id=call_id, reason="caller_hangup", duration_s=duration)):
            log.warning("call %s: no gateway holds it, and %s has it %s: ended", call_id,
                        carrier, at_carrier.status)
        return
    log.warning("call %s: no gateway holds it, and %s has it %s: hanging up", call_id, carrier,
                at_carrier.status)
    try:
        await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
            org_id=org_id, call_id=call_id, reason="error", duration_s=duration_s))
    finally:
        await rest.hangup(carrier_call_id)


async def _ask_twilio(rest: TwilioCalls, call_sid: str) -> AtCarrier:
    try:
        call = await rest.fetch(call_sid)
    except TwilioRestException as exc:
        if exc.status != 404:
            raise
        return AtCarrier(live=None)
    return AtCarrier(live=call.status not in ENDED_AT_TWILIO, status=call.status,
                     duration_s=float(call.duration) if call.duration is not None else None)


async def _ask_plivo(rest: PlivoCalls, call_uuid: str) -> AtCarrier:
    call = await rest.fetch(call_uuid)
    if call is None:
        return AtCarrier(live=None)
    return AtCarrier(live=call.live, status=call.status, duration_s=call.duration_s)
