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

Each round also settles two kinds of call the check above never sees:

- An end claimed (``ended_at`` set) more than :data:`CLAIMED_END_SETTLE_AFTER_S` ago whose
  ``call.ended``/``call.failed`` is not in the event store: its claim's give-back did not
  finish at shutdown (Postgres slow, cancelled after 2 s), or the gateway died between claiming
  and publishing it. The end is published as claimed (its reason and time); one found stored
  is only marked. Either way an ``end:stored`` milestone, claimed in the transaction that
  publishes, makes it once whichever instances settle the call, and the end's one id
  (:func:`.calls.end_event_id`) makes it stored once if its own outbox still publishes it
  (retrying through an outage, or this instance's clock minutes ahead); ends claimed more than
  :data:`CLAIMED_END_HORIZON_S` ago are not looked at (the event stream keeps 7 days).
- A call never answered, not ended, created more than :data:`UNANSWERED_AFTER_S` ago (its
  ``call.failed`` or end given up, the claim given back): its carrier is asked, and an
  ended call gets the end the carrier's status callback would have published (busy, no
  answer, failed, canceled → ``call.failed``; completed → ``call.ended``; unknown to the
  carrier → ``call.failed`` ``failed``). A Plivo call is asked live, then for its record,
  then as queued: an outbound call Plivo has not dialled yet (its calls per second spent) is
  known by its ``RequestUUID`` only to the queued lookup, and is left for a later round. One no
  longer queued that no callback re-keyed to its ``CallUUID`` cannot be asked about at all
  (no Plivo lookup takes a ``RequestUUID`` once the call is dequeued, nor maps one to its
  ``CallUUID``): it fails with carrier status :data:`PLIVO_REQUEST_UNKNOWN`, its callbacks
  (hangup's, 15 minutes on) having never reached us. Plivo's record of an ended call has no status:
  one with no ``answer_time`` failed, its reason from the record's hangup cause
  (:attr:`parley.gateway.plivo.rest.AtPlivo.failure`). One still ringing is left for a
  later round. A round asks about :data:`UNANSWERED_LOOKUPS_PER_ROUND` such calls at most,
  the next going on after the last it asked about (and from the oldest again once it
  reached the newest).

And a third kind, which has no ``carrier_calls`` row at all: an outbound call the ``calls``
read model still has ``requested`` more than :data:`NEVER_DIALLED_AFTER_S` after it was
requested, no carrier id recorded for it, and neither ``call.dialing`` nor an end in the event
stream. Its request ended (its gateway died or was stopped) after ``call.requested`` and before
the carrier was asked, and a retry of it, if any, placed a call of another id: nothing would
ever end it. It fails, reason ``failed``, carrier status :data:`NEVER_DIALLED` (no carrier was
asked: none recorded the call, nor called back for it, in that time), with the end's one id.
Calls requested more than :data:`NEVER_DIALLED_HORIZON_S` ago (the stream keeps 7 days) are not
looked at; a round looks at as many as it asks carriers about, going on as above.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, get_args, get_type_hints

from aiohttp import web
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from twilio.base.exceptions import TwilioRestException

from parley.common.bus import EVENTS_STREAM, call_events, command_subject
from parley.common.events import CallEnded, CallFailed, CallTransferred

from .call_outboxes import END_STORED
from .calls import claim_milestone, end_event_id, publish_end, seconds_since
from .keys import BUS, CALL_OUTBOXES, CLOCK, CONFIG, POOL, TWILIO_REST
from .plivo.rest import PLIVO_REST, PlivoCalls
from .twilio.next_stream import ENDED_AT_TWILIO
from .twilio.rest import TwilioCalls

log = logging.getLogger(__name__)

BATCH = 1000  # calls read at once, oldest first
PING_TIMEOUT_S = 2.0  # a ping unanswered in time has a responder: the call is held
# An end claimed this long ago not in the event store is published (an outbox retries an end
# for about a minute, and gives its claim back if it gives up).
CLAIMED_END_SETTLE_AFTER_S = 300.0
CLAIMED_END_HORIZON_S = 24 * 3600.0  # ends claimed longer ago are not looked at
# A call never answered nor ended this long after it was created is asked of its carrier
# (Twilio rings for at most 600 s).
UNANSWERED_AFTER_S = 900.0
# Unanswered calls asked of their carrier in a round at most (one REST lookup each, every
# round on every instance): a backlog is asked about over rounds, not all at once against the
# carrier's rate limits while the orphan check of live calls waits for the round to end.
UNANSWERED_LOOKUPS_PER_ROUND = 50
# An outbound call the read model still has "requested" this long after, with no carrier id
# recorded and nothing but its request in the event store, was never dialled: its request
# ended (its process died) between call.requested and asking the carrier, and its retry, if
# any, placed a call of another id. Well past a request's leases (2 min) and Twilio's 600 s of
# ringing, whose status callbacks would have recorded a call the carrier placed.
NEVER_DIALLED_AFTER_S = 900.0
# Requested calls older than this are not looked at: the event stream keeps 7 days, and what
# it holds of a call is what tells a call never dialled.
NEVER_DIALLED_HORIZON_S = 6 * 24 * 3600.0
NEVER_DIALLED = "never dialled"  # such a call's call.failed carrier_status
# end reasons that are call.failed's, not call.ended's (the carriers' status callbacks)
FAILED_REASONS = frozenset({"busy", "no_answer", "failed", "canceled"})
_ENDED_REASONS = frozenset(get_args(get_type_hints(CallEnded)["reason"]))
# call.failed's carrier_status for a Plivo call none of its lookups knows: for an outbound
# call still keyed by its RequestUUID (no callback gave us its CallUUID), Plivo knows that
# id only while the call is queued (see parley.gateway.plivo.rest.PlivoCalls.fetch)
PLIVO_REQUEST_UNKNOWN = "unknown: not queued, live nor recorded at Plivo under this id"
_FAILED_AT_TWILIO = {"busy": "busy", "no-answer": "no_answer", "failed": "failed",
                     "canceled": "canceled"}


Position = tuple[datetime, str]  # a call's (created_at, call_id), to go on after


class AtCarrier(NamedTuple):
    """What the carrier says of a call: ``live`` None if it knows no such call (404)."""

    live: bool | None
    status: str = ""  # its word for the call, logged (and call.failed's carrier_status)
    duration_s: float | None = None  # an ended call's
    failed: str | None = None  # an ended call never answered: its call.failed reason


async def run(app: web.Application) -> None:
    """Look for calls no instance holds every ``gateway_orphan_check_s``, until cancelled."""
    interval = app[CONFIG].gateway_orphan_check_s
    unheld: dict[str, int] = {}  # calls no instance held in the last round → their streams
    unanswered_after: Position | None = None  # the last unanswered call asked about
    never_dialled_after: Position | None = None  # the last requested call looked at
    while True:
        await asyncio.sleep(interval)
        try:
            unheld = await check(app, unheld)
        except Exception:  # a database or bus outage: the next round tries again
            log.exception("orphaned calls: the round failed")
        try:
            await settle_claimed_ends(app)
            unanswered_after = await settle_unanswered(app, unanswered_after)
            never_dialled_after = await settle_never_dialled(app, never_dialled_after)
        except Exception:
            log.exception("orphaned calls: settling ends failed")


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


async def settle_claimed_ends(app: web.Application) -> None:
    """Publish the ends claimed long ago that are not in the event store (see the module)."""
    now = app[CLOCK]()
    after = (now - timedelta(seconds=CLAIMED_END_HORIZON_S), "")
    before = now - timedelta(seconds=CLAIMED_END_SETTLE_AFTER_S)
    while True:
        async with app[POOL].connection() as conn:
            cursor = await conn.execute(
                "SELECT c.call_id, org_id, answered_at, ended_at, end_reason FROM carrier_calls c "
                "WHERE ended_at IS NOT NULL AND ended_at < %s AND (ended_at, c.call_id) > (%s, %s) "
                "AND NOT EXISTS (SELECT 1 FROM carrier_call_milestones m "
                "WHERE m.call_id = c.call_id AND m.milestone = %s) "
                "ORDER BY ended_at, c.call_id LIMIT %s", (before, *after, END_STORED, BATCH))
            rows = await cursor.fetchall()
        for call_id, org_id, answered_at, ended_at, reason in rows:
            try:
                await _settle_claimed_end(app, call_id, org_id, answered_at, ended_at, reason)
            except Exception:  # the bus or the database: the next round tries again
                log.exception("call %s: settling its claimed end failed", call_id)
        if len(rows) < BATCH:
            return
        after = (rows[-1][3], rows[-1][0])


async def _settle_claimed_end(app: web.Application, call_id: str, org_id: str,
                              answered_at: datetime | None, ended_at: datetime,
                              reason: str) -> None:
    event: CallEnded | CallFailed
    # the end's own id: one its outbox still publishes (an outage, clocks apart) is stored once
    end_id = end_event_id(call_id)
    if (reason in FAILED_REASONS and answered_at is None) or reason not in _ENDED_REASONS:
        event = CallFailed(id=end_id, org_id=org_id, call_id=call_id, at=ended_at,
                           reason=reason)
    else:
        event = CallEnded(id=end_id, org_id=org_id, call_id=call_id, at=ended_at,
                          reason=reason,  # type: ignore[arg-type]
                          duration_s=seconds_since(answered_at, ended_at))
    stored = await _end_stored(app, org_id, call_id)
    async with app[POOL].connection() as conn, conn.transaction():
        # whoever claims the milestone publishes (another instance waits on it, then skips)
        if not await claim_milestone(conn, call_id, END_STORED) or stored:
            return
        await app[BUS].publish(event)
    log.warning("call %s: its end (%s, %s) was claimed at %s but never stored: published",
                call_id, event.type, reason, ended_at.isoformat())


async def _end_stored(app: web.Application, org_id: str, call_id: str) -> bool:
    for end in ("call.ended", "call.failed"):
        try:
            await app[BUS].js.get_last_msg(EVENTS_STREAM, call_events(call_id, org_id, end))
        except NotFoundError:
            continue
        return True
    return False


async def settle_unanswered(app: web.Application, after: Position | None = None) -> Position | None:
    """End the calls never answered nor ended that their carrier has over (see the module).

    :data:`UNANSWERED_LOOKUPS_PER_ROUND` calls at most, oldest first from after ``after`` (the
    last call the round before asked about); returns where the next round goes on (None: from
    the oldest again, every call having been asked about).
    """
    before = app[CLOCK]() - timedelta(seconds=UNANSWERED_AFTER_S)
    start = after or (datetime.min.replace(tzinfo=UTC), "")
    async with app[POOL].connection() as conn:
        cursor = await conn.execute(
            "SELECT call_id, carrier, carrier_call_id, org_id, created_at FROM carrier_calls "
            "WHERE carrier IN ('twilio', 'plivo') AND ended_at IS NULL "
            "AND answered_at IS NULL AND created_at < %s AND (created_at, call_id) > (%s, %s) "
            "ORDER BY created_at, call_id LIMIT %s",
            (before, *start, UNANSWERED_LOOKUPS_PER_ROUND))
        rows = await cursor.fetchall()
    for call_id, carrier, carrier_call_id, org_id, _ in rows:
        try:
            await _settle_unanswered(app, call_id, carrier, carrier_call_id, org_id)
        except Exception:  # the carrier or the bus: asked about next time round
            log.exception("call %s: never answered, and settling it failed", call_id)
    if len(rows) < UNANSWERED_LOOKUPS_PER_ROUND:
        return None
    return rows[-1][4], rows[-1][0]


async def _settle_unanswered(app: web.Application, call_id: str, carrier: str,
                             carrier_call_id: str, org_id: str) -> None:
    twilio, plivo = app[TWILIO_REST], app.get(PLIVO_REST)
    if carrier == "twilio" and twilio is not None:
        at_carrier = await _ask_twilio(twilio, carrier_call_id)
    elif carrier == "plivo" and plivo is not None:
        at_carrier = await _ask_plivo(plivo, carrier_call_id)
    else:
        return
    if at_carrier.live:
        return  # still ringing (or queued): a later round asks again
    event: CallEnded | CallFailed
    if at_carrier.live is None:
        event = CallFailed(org_id=org_id, call_id=call_id, reason="failed",
                           carrier_status=PLIVO_REQUEST_UNKNOWN if carrier == "plivo"
                           else "unknown")
    elif at_carrier.failed is not None:
        event = CallFailed(org_id=org_id, call_id=call_id, reason=at_carrier.failed,
                           carrier_status=at_carrier.status)
    else:  # completed: answered, then over
        event = CallEnded(org_id=org_id, call_id=call_id, reason="completed",
                          duration_s=at_carrier.duration_s or 0.0)
    if await publish_end(app[POOL], app[CALL_OUTBOXES], event):
        log.warning("call %s: never answered nor ended, and %s has it %s: %s", call_id,
                    carrier, at_carrier.status or "unknown", event.type)


async def settle_never_dialled(app: web.Application,
                               after: Position | None = None) -> Position | None:
    """Fail the outbound calls requested long ago and never dialled (see the module).

    From the ``calls`` read model: :data:`UNANSWERED_LOOKUPS_PER_ROUND` calls at most, oldest
    first from after ``after``; returns where the next round goes on (None: from the oldest).
    """
    now = app[CLOCK]()
    start = after or (now - timedelta(seconds=NEVER_DIALLED_HORIZON_S), "")
    async with app[POOL].connection() as conn:
        cursor = await conn.execute(
            "SELECT c.call_id, c.org_id, c.requested_at FROM calls c "
            "WHERE c.state = 'requested' AND c.direction = 'outbound' "
            "AND c.requested_at < %s AND (c.requested_at, c.call_id) > (%s, %s) "
            "AND NOT EXISTS (SELECT 1 FROM carrier_calls k WHERE k.call_id = c.call_id) "
            "ORDER BY c.requested_at, c.call_id LIMIT %s",
            (now - timedelta(seconds=NEVER_DIALLED_AFTER_S), *start,
             UNANSWERED_LOOKUPS_PER_ROUND))
        rows = await cursor.fetchall()
    for call_id, org_id, requested_at in rows:
        try:
            await _settle_never_dialled(app, call_id, org_id, requested_at)
        except Exception:  # the bus: looked at again once the rounds come back round
            log.exception("call %s: never dialled, and failing it failed", call_id)
    if len(rows) < UNANSWERED_LOOKUPS_PER_ROUND:
        return None
    return rows[-1][2], rows[-1][0]


async def _settle_never_dialled(app: web.Application, call_id: str, org_id: str,
                                requested_at: datetime) -> None:
    # the read model follows the stream: what the stream holds of the call decides
    for later in ("call.dialing", "call.ended", "call.failed"):
        try:
            await app[BUS].js.get_last_msg(EVENTS_STREAM, call_events(call_id, org_id, later))
        except NotFoundError:
            continue
        return  # dialled, or over: its own events settle it
    # the end's one id: instances settling it at once, or again before the read model has
    # it, store it once
    await app[BUS].publish(CallFailed(id=end_event_id(call_id), org_id=org_id, call_id=call_id,
                                      reason="failed", carrier_status=NEVER_DIALLED))
    log.warning("call %s: requested at %s and never dialled (no carrier id, no call.dialing): "
                "failed", call_id, requested_at.isoformat())


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
                     duration_s=float(call.duration) if call.duration is not None else None,
                     failed=_FAILED_AT_TWILIO.get(call.status))


async def _ask_plivo(rest: PlivoCalls, call_uuid: str) -> AtCarrier:
    call = await rest.fetch(call_uuid)
    if call is None:
        return AtCarrier(live=None)
    failed = call.failure
    # Plivo's word for how a call never answered ended: its hangup cause ("Busy Line")
    return AtCarrier(live=call.live, status=call.hangup_cause if failed else call.status,
                     duration_s=call.duration_s, failed=failed)
