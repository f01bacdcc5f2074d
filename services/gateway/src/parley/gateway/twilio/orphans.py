"""Calls no gateway instance holds: their gateway was killed mid-call (SIGKILL, OOM, a lost node).

Its sockets died with it, and nothing of it is left to end their calls: Twilio, its stream
gone, asks the ``<Connect action>`` URL, which finds no instance if that gateway was the only
one and it is still down, and then drops the call; an inbound call has no status callback of
ours, so ``call.ended`` never came and the call stayed live in the store for good (a chaos run:
every call in progress when the gateway was killed). A call back on a new stream has a socket
again; one whose reconnect failed has none.

So every instance looks every ``gateway_orphan_check_s`` at the answered Twilio calls not ended:
whether any instance holds the call's socket is whether any answers its ``ping`` command (no
responders: none does). A call none holds in two rounds in a row (a stream starting, or a DTMF
redirect's next one, takes seconds), and on no new stream in between (each stream's start is a
``stream:<id>`` milestone: an agent sending digits often is between streams at many a round),
is asked of Twilio, as a dead socket's is: over →
``call.ended`` (``caller_hangup``, Twilio's duration); still up → hung up (REST), reason
``error``; unknown to Twilio (404) → ``call.ended``, reason ``error``. Several instances may
decide the same call: ``call.ended`` is published once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from nats.errors import NoRespondersError
from twilio.base.exceptions import TwilioRestException

from parley.common.bus import command_subject
from parley.common.events import CallEnded

from ..calls import publish_end, seconds_since
from ..keys import BUS, CLOCK, CONFIG, POOL, TWILIO_REST
from .next_stream import ENDED_AT_TWILIO

log = logging.getLogger(__name__)

BATCH = 1000  # calls read at once, oldest first
PING_TIMEOUT_S = 2.0  # a ping unanswered in time has a responder: the call is held


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
                "SELECT call_id, carrier_call_id, org_id, answered_at, (SELECT count(*) FROM "
                "carrier_call_milestones m WHERE m.call_id = c.call_id AND m.milestone LIKE "
                "'stream:%%') FROM carrier_calls c "
                "WHERE carrier = 'twilio' AND ended_at IS NULL AND answered_at IS NOT NULL "
                "AND (answered_at, call_id) > (%s, %s) ORDER BY answered_at, call_id LIMIT %s",
                (*after, BATCH))
            rows = await cursor.fetchall()
        await _look_at(app, rows, unheld_before, unheld)
        if len(rows) < BATCH:
            return unheld
        after = (rows[-1][3], rows[-1][0])


async def _look_at(app: web.Application, rows: list[Any], unheld_before: dict[str, int],
                   unheld: dict[str, int]) -> None:
    for call_id, carrier_call_id, org_id, answered_at, streams in rows:
        if await _held(app, call_id):
            continue
        unheld[call_id] = streams
        if unheld_before.get(call_id) != streams:
            continue
        try:
            await _end(app, call_id, carrier_call_id, org_id,
                       seconds_since(answered_at, app[CLOCK]()))
        except Exception:  # Twilio or the bus failing: this call is asked about next round
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


async def _end(app: web.Application, call_id: str, carrier_call_id: str, org_id: str,
               duration_s: float) -> None:
    rest = app[TWILIO_REST]
    if rest is None:
        return
    try:
        at_twilio = await rest.fetch(carrier_call_id)
    except TwilioRestException as exc:
        if exc.status != 404:
            raise
        # Twilio knows no such call (any more): nothing is up to hang up, nor says who ended it
        if await publish_end(app[POOL], app[BUS], CallEnded(
                org_id=org_id, call_id=call_id, reason="error", duration_s=duration_s)):
            log.warning("call %s: no gateway holds it, and Twilio does not know it: ended",
                        call_id)
        return
    if at_twilio.status in ENDED_AT_TWILIO:
        duration = float(at_twilio.duration) if at_twilio.duration is not None else duration_s
        if await publish_end(app[POOL], app[BUS], CallEnded(
                org_id=org_id, call_id=call_id, reason="caller_hangup", duration_s=duration)):
            log.warning("call %s: no gateway holds it, and Twilio has it %s: ended", call_id,
                        at_twilio.status)
        return
    log.warning("call %s: no gateway holds it, and Twilio has it %s: hanging up", call_id,
                at_twilio.status)
    try:
        await publish_end(app[POOL], app[BUS], CallEnded(
            org_id=org_id, call_id=call_id, reason="error", duration_s=duration_s))
    finally:
        await rest.hangup(carrier_call_id)
