"""``Idempotency-Key`` on ``POST /v1/calls``: a retried request never rings the callee twice.

An integrator whose request timed out, or got a 5xx or a reset connection, cannot know whether
the callee is ringing; with the same key, its retry gets the first request's outcome instead of
a second call (Stripe's semantics). Keys are per org, in ``api_idempotency_keys`` (migration
013), and live :data:`KEY_TTL` from their first request:

- The first request with a key claims its row (``claimed``, its call id chosen, a lease of
  :data:`CLAIM_LEASE`) after validation; just before it asks the carrier to dial it marks the
  row ``in_flight`` (a lease of :data:`IN_FLIGHT_LEASE`), a compare-and-set on its call id;
  and it replaces the lease with its outcome (status code and response body: a call id or a
  problem).
- A retry whose body hashes the same (:func:`request_hash`: the canonical body, numbers in
  E.164) gets that outcome again, marked ``Idempotent-Replayed: true``; one with another body
  is a 422; one while the first is in flight (either lease running) a 409 with
  ``Retry-After``.
- A claim whose lease ran out never marked ``in_flight`` (its process died, or stopped, before
  it dialled) is taken over by the retry: a compare-and-set gives the row the retry's call id
  and lease, and the retry is processed as a first request, dialling once. The first request,
  if it was only slow, finds its claim gone when it comes to mark it: it dials nothing, fails
  the call it requested and answers 409. (Before, such a key answered 500 for its whole day.)
- A first request whose ``in_flight`` lease ran out (its process died, or stopped, mid-dial)
  is decided by what is recorded, never by dialling again: a ``carrier_calls`` row for its call
  id (the recording, or the carrier's first webhook, which carries our ids) makes it the 201
  it would have been; with none, a 500 that names the call id and says the key will not dial:
  the carrier may have placed the call. Rows ``in_flight`` from before ``claimed`` existed are
  decided so too.
- A request that placed nothing and said so (429, or a 503 that says it is safe to retry) gives
  its key back: the retry is processed afresh. Requests refused by validation never claim one.
  If giving it back fails too (Postgres away), the retry still dials once: a key left
  ``claimed`` is taken over when its lease is out; one left ``in_flight`` (its mark written
  but its answer lost) is taken over at once when the event store holds the call.failed its
  request published for the call not dialled (an id only that path gives it:
  :func:`parley.gateway.outbound.not_dialled_event_id`), which no request that asked the
  carrier ever publishes. Without that proof an ``in_flight`` key is decided as above.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web
from nats.js.errors import NotFoundError

from parley.common.bus import EVENTS_STREAM, call_events
from parley.common.events import decode
from parley.common.problems import Problem, problem_response

from ..keys import BUS, CLOCK, POOL
from ..outbound import NotDialled, not_dialled_event_id
from .schemas import CallCreated, PlaceCall

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255  # Stripe's bound: room for a UUID or a caller's own composite id
KEY_TTL = timedelta(hours=24)
# From its claim to its dial a first request takes its rate limit and its call.requested
# publish (seconds even through a NATS blip): a claim not dialling after this is taken over by
# a retry. Its request, if only slow, cannot dial then (the mark is a compare-and-set), so
# neither a short lease nor instances' clocks apart can make the callee ring twice.
CLAIM_LEASE = timedelta(seconds=60)
# A dialling request takes at most the carrier's 10 s and the recording's retries (about half a
# minute): past this it is taken for interrupted, as a callback left dialing is.
IN_FLIGHT_LEASE = timedelta(minutes=2)
IN_FLIGHT_RETRY_AFTER_S = 1
_canonical = msgspec.json.Encoder(order="sorted")


def read_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, None without one; a 400 problem when malformed."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise _bad_key(f"send one {HEADER} header, not {len(values)}")
    [key] = values
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise _bad_key(f"an {HEADER} has 1 to {MAX_KEY_LENGTH} characters")
    if not all(" " <= char <= "~" for char in key):
        raise _bad_key(f"an {HEADER} is printable ASCII (a UUID, say)")
    return key


def _bad_key(detail: str) -> Problem:
    return Problem(400, "Bad Request", detail, kind="invalid-idempotency-key")


def request_hash(body: PlaceCall, *, to_number: str, from_number: str) -> str:
    """sha256 of the body as it will be placed: keys sorted, numbers as E.164."""
    canonical = {"agent_id": body.agent_id, "to": to_number, "from": from_number,
                 "context": body.context, "metadata": body.metadata}
    return hashlib.sha256(_canonical.encode(canonical)).hexdigest()


@dataclass(frozen=True)
class Claim:
    """The key this request claimed; ``call_id`` is the id its call must have."""

    org_id: str
    key: str
    call_id: str


_COLUMNS = "request_hash, call_id, state, locked_until, response_status, response_body"
CLAIMED, IN_FLIGHT, DONE = "claimed", "in_flight", "done"  # a key's states, in order


class TakenOver(NotDialled):
    """The request's claim on its key was taken over by a retry: it must not dial."""


async def claim(app: web.Application, *, org_id: str, key: str, request_hash: str,
                call_id: str) -> Claim | web.Response:
    """Claim ``key`` for this request, or the response a retry of its first request gets.

    A claim whose request died before it dialled is taken over (see the module).
    """
    now = app[CLOCK]()
    for _ in range(3):  # a row expired, given back or taken over between the writes and read
        async with app[POOL].connection() as conn:
            await conn.execute(
                "DELETE FROM api_idempotency_keys WHERE org_id = %s AND idempotency_key = %s "
                "AND created_at <= %s", (org_id, key, now - KEY_TTL))
            cursor = await conn.execute(
                "INSERT INTO api_idempotency_keys (org_id, idempotency_key, request_hash, "
                "call_id, state, locked_until, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (org_id, key, request_hash, call_id, CLAIMED, now + CLAIM_LEASE, now))
            if await cursor.fetchone() is not None:
                return Claim(org_id=org_id, key=key, call_id=call_id)
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM api_idempotency_keys WHERE org_id = %s "
                "AND idempotency_key = %s", (org_id, key))
            row = await cursor.fetchone()
            if row is None:
                continue
            stored_hash, stale_call_id, state, locked_until, _, _ = row
            if (stored_hash == request_hash and state == IN_FLIGHT
                    and await _proven_not_dialled(app, org_id, stale_call_id)):
                # marked dialling, then not dialled (the mark's answer lost, say) and the key
                # not given back: its request has ended placing nothing, lease or not, so this
                # request takes the key over (a compare-and-set on the stale call id)
                cursor = await conn.execute(
                    "UPDATE api_idempotency_keys SET call_id = %s, state = %s, "
                    "locked_until = %s WHERE org_id = %s AND idempotency_key = %s "
                    "AND state = %s AND call_id = %s RETURNING 1",
                    (call_id, CLAIMED, now + CLAIM_LEASE, org_id, key, IN_FLIGHT,
                     stale_call_id))
                if await cursor.fetchone() is None:
                    continue
                log.warning("idempotency key of call %s (org %s): its request never dialled "
                            "(call %s failed not dialled, the key not given back); taken "
                            "over by a retry", call_id, org_id, stale_call_id)
                return Claim(org_id=org_id, key=key, call_id=call_id)
            if stored_hash == request_hash and state == CLAIMED and locked_until <= now:
                # never dialled, and its lease is out: this request takes it over, if no other
                # retry did first (the update is a compare-and-set on the claim's call id)
                cursor = await conn.execute(
                    "UPDATE api_idempotency_keys SET call_id = %s, locked_until = %s "
                    "WHERE org_id = %s AND idempotency_key = %s AND state = %s "
                    "AND call_id = %s AND locked_until <= %s RETURNING 1",
                    (call_id, now + CLAIM_LEASE, org_id, key, CLAIMED, stale_call_id, now))
                if await cursor.fetchone() is None:
                    continue
                log.warning("idempotency key of call %s (org %s): its request never dialled "
                            "(claimed for call %s until %s); taken over by a retry", call_id,
                            org_id, stale_call_id, locked_until.isoformat())
                return Claim(org_id=org_id, key=key, call_id=call_id)
        return await _answer_retry(app, org_id, key, request_hash, row, now)
    raise Problem(409, "Conflict", f"the {HEADER} is being given back by another request; "
                  "retry", kind="idempotency-key-in-use")


async def _proven_not_dialled(app: web.Application, org_id: str, call_id: str) -> bool:
    """Whether the event store holds the call.failed of ``call_id`` not dialled.

    :func:`parley.gateway.outbound.not_dialled_event_id`: published only when the request,
    its key marked dialling or not, failed before the carrier was asked.

    Not proven when the event store cannot be asked (NATS away): the key is then decided by
    the database alone, as without the proof — never dialled again — and at once, not after
    a JetStream timeout.
    """
    bus = app[BUS]
    if not bus.nc.is_connected:
        return False
    try:
        msg = await bus.js.get_last_msg(EVENTS_STREAM,
                                        call_events(call_id, org_id, "call.failed"))
    except NotFoundError:
        return False
    except Exception as exc:
        log.warning("call %s: whether it failed not dialled is unknown (%r); its idempotency "
                    "key is decided without", call_id, exc)
        return False
    return decode(msg.data or b"").id == not_dialled_event_id(call_id)


async def mark_dialling(app: web.Application, claim: Claim) -> None:
    """Mark ``claim``'s key dialling, just before the carrier is asked.

    :class:`TakenOver` if a retry took the claim over: this request must not dial then. Once
    marked, the key is never dialled again: a request that dies now may have placed the
    call, and its retry is decided by what is recorded.
    """
    async with app[POOL].connection() as conn:
        cursor = await conn.execute(
            "UPDATE api_idempotency_keys SET state = %s, locked_until = %s WHERE org_id = %s "
            "AND idempotency_key = %s AND call_id = %s AND state = %s RETURNING 1",
            (IN_FLIGHT, app[CLOCK]() + IN_FLIGHT_LEASE, claim.org_id, claim.key,
             claim.call_id, CLAIMED))
        if await cursor.fetchone() is None:
            raise TakenOver(f"its {HEADER} was taken over by a retry before it dialled")


async def _answer_retry(app: web.Application, org_id: str, key: str, request_hash: str,
                        row: tuple[Any, ...], now: datetime) -> web.Response:
    stored_hash, call_id, state, locked_until, status, body = row
    if stored_hash != request_hash:
        return problem_response(
            422, "Unprocessable Content", f"this {HEADER} was used with another request body; "
            "a retry must send the same body, a new call a new key", kind="idempotency-key-reused")
    if state == DONE:
        return replay(status, bytes(body), call_id)
    if locked_until > now:
        response = problem_response(
            409, "Conflict", f"the first request with this {HEADER} is still being processed; "
            f"retry in {IN_FLIGHT_RETRY_AFTER_S} s for its outcome", kind="idempotency-key-in-use",
            extra={"retry_after_s": IN_FLIGHT_RETRY_AFTER_S})
        response.headers["Retry-After"] = str(IN_FLIGHT_RETRY_AFTER_S)
        return response
    # The first request was interrupted dialling (or, a row of before ``claimed``, at any
    # point): what is recorded decides; nothing is dialled again.
    async with app[POOL].connection() as conn:
        cursor = await conn.execute("SELECT 1 FROM carrier_calls WHERE call_id = %s AND "
                                    "org_id = %s", (call_id, org_id))
        placed = await cursor.fetchone() is not None
    if placed:
        created = msgspec.json.encode(CallCreated(call_id=call_id))
        await finish(app, Claim(org_id=org_id, key=key, call_id=call_id), 201, created)
        return replay(201, created, call_id)
    log.warning("idempotency key of call %s (org %s): its request was interrupted and no carrier "
                "recorded the call", call_id, org_id)
    return problem_response(
        500, "Internal Server Error", f"the first request with this {HEADER} was interrupted "
        f"before its outcome was recorded, and no carrier has reported placing its call "
        f"{call_id}: GET /v1/calls/{call_id} shows the call if it was placed. This key will not "
        "dial again; place the call with a new key if it was not", kind="idempotency-key-"
        "interrupted", extra={"call_id": call_id})


def replay(status: int, body: bytes, call_id: str) -> web.Response:
    """The first request's outcome, again."""
    response = web.Response(status=status, body=body, content_type="application/json"
                            if status < 400 else "application/problem+json")
    response.headers[REPLAYED_HEADER] = "true"
    if status == 201:
        response.headers["Location"] = f"/v1/calls/{call_id}"
    return response


async def finish(app: web.Application, claim: Claim, status: int, body: bytes) -> None:
    """Record the outcome of the request holding ``claim`` (unless it was decided already).

    A failure is logged, not raised: the answer stands, and a retry after the lease is
    decided by what ``carrier_calls`` records.
    """
    try:
        async with app[POOL].connection() as conn:
            await conn.execute(
                "UPDATE api_idempotency_keys SET state = %s, response_status = %s, "
                "response_body = %s WHERE org_id = %s AND idempotency_key = %s AND call_id = %s "
                "AND state IN (%s, %s)", (DONE, status, body, claim.org_id, claim.key,
                                          claim.call_id, CLAIMED, IN_FLIGHT))
    except Exception:
        log.exception("call %s: its idempotency key's outcome (%d) was not recorded",
                      claim.call_id, status)


async def give_back(app: web.Application, claim: Claim) -> None:
    """Forget ``claim``: its request placed nothing, and its retry is to be processed afresh.

    A failure (Postgres away) is logged: the key is then left to its lease, and a retry after
    it still dials once. A claim never marked dialling is taken over as any claim whose
    request died; one marked dialling, by the call.failed its request published for the call
    not dialled (:func:`_proven_not_dialled`).
    """
    try:
        async with app[POOL].connection() as conn:
            await conn.execute(
                "DELETE FROM api_idempotency_keys WHERE org_id = %s AND idempotency_key = %s "
                "AND call_id = %s AND state IN (%s, %s)", (claim.org_id, claim.key,
                                                          claim.call_id, CLAIMED, IN_FLIGHT))
    except Exception:
        log.exception("call %s: its idempotency key was not given back", claim.call_id)


async def expire(app: web.Application) -> int:
    """Delete the keys older than :data:`KEY_TTL`; how many."""
    async with app[POOL].connection() as conn:
        cursor = await conn.execute("DELETE FROM api_idempotency_keys WHERE created_at <= %s",
                                    (app[CLOCK]() - KEY_TTL,))
        return cursor.rowcount

