"""``POST /v1/calls`` (place an outbound call) and ``GET /v1/calls/{call_id}`` (read one).

Placing a call: authenticate (``calls:write``), validate the body and the numbers, take one
of the org's calls from its rate limit (none left: 429 with ``Retry-After``, nothing dialled;
:mod:`parley.gateway.api.rate_limit`), then place it (:func:`parley.gateway.outbound.
place_outbound`: call.requested, the carrier that owns the ``from`` number dials, then
``carrier_calls`` and call.dialing). A carrier that refuses publishes call.failed and answers
422 (the request's fault) or 502 (anyone else's). A call the carrier placed is 201 even when
recording it failed through the retries (:class:`parley.gateway.outbound.DialledNotRecorded`):
a 500 would invite a retry that rings the callee twice. When call.requested cannot be published
(NATS down), the carrier was never asked (:class:`parley.gateway.outbound.NotDialled`): 503 with
``Retry-After``, saying the call was not dialled and is safe to place again; the call's token
goes back to the org's rate limit.

With an ``Idempotency-Key`` header, a retry of a request gets its first outcome again instead of
a second call; the same key with another body is a 422, one while the first is in flight a 409
(:mod:`parley.gateway.api.idempotency`).

Reading a call: the ``calls`` read model, scoped to the key's org — another org's call is a
404, like a call that does not exist. The read model follows the bus a moment behind; until
the recorder has seen a call, the gateway's own ``carrier_calls`` row answers for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from parley.common.configuration import Agent, PhoneNumber, find_number, get_agent
from parley.common.events import is_token
from parley.common.problems import Problem, problem_response
from parley.common.request_bodies import read_body

from ..calls import CarrierCall, find_by_call_id, new_call_id
from ..keys import CALL_RATE_LIMITER, METRICS, POOL
from ..outbound import DialledNotRecorded, NotDialled, place_outbound
from . import idempotency
from .auth import authenticate
from .dialing import CarrierUnavailable, DialError
from .rate_limit import retry_after_header
from .schemas import (
    MAX_BODY_BYTES,
    CallCreated,
    CallView,
    PlaceCall,
    decode_body,
    e164,
    invalid,
    storable,
)

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/calls"
# How long a client told the call was not dialled (NATS down) waits before placing it again:
# a few of the bus client's reconnect attempts, about what a nats-server restart takes.
NOT_DIALLED_RETRY_AFTER_S = 5
_encoder = msgspec.json.Encoder()


def _json(body: msgspec.Struct, *, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body),
                        content_type="application/json", headers=headers)


def _count(request: web.Request, outcome: str) -> None:
    request.app[METRICS].counter("gateway_api_calls_placed", "POST /v1/calls, by outcome",
                                 ["outcome"]).labels(outcome).inc()


async def place_call(request: web.Request) -> web.Response:
    """Have an agent call a number; 201 with the call id once the carrier is dialing."""
    key = await authenticate(request, "calls:write")
    idempotency_key = idempotency.read_key(request)
    body = decode_body(await read_body(request, MAX_BODY_BYTES), PlaceCall)
    storable(body.context, "context")
    storable(body.metadata, "metadata")
    to_number, from_number = e164(body.to, "to"), e164(body.from_, "from")
    if to_number == from_number:
        raise invalid("to", "an agent cannot call the number it calls from")
    app, org_id = request.app, key.org_id
    async with app[POOL].connection() as conn:
        agent = await get_agent(conn, body.agent_id, org_id=org_id)
        number = await find_number(conn, from_number)
    if agent is None:
        _count(request, "unknown_agent")
        raise Problem(404, "Not Found", f"no agent {body.agent_id}", kind="unknown-agent")
    if number is None or number.org_id != org_id:
        raise invalid("from", f"{from_number} is not one of your numbers")
    call_id = new_call_id()
    if idempotency_key is None:
        return await _place(request, call_id, agent, number, to_number, body)
    claimed = await idempotency.claim(
        app, org_id=org_id, key=idempotency_key, call_id=call_id, request_hash=idempotency.
        request_hash(body, to_number=to_number, from_number=from_number))
    if isinstance(claimed, web.Response):  # a retry: the first request's outcome, or why not
        _count(request, "replayed" if idempotency.REPLAYED_HEADER in claimed.headers
               else "idempotency_refused")
        return claimed
    try:
        response = await _place(request, claimed.call_id, agent, number, to_number, body,
                                before_dial=lambda: idempotency.mark_dialling(app, claimed))
    except Problem as exc:
        response = problem_response(exc.status, exc.title, exc.detail, kind=exc.kind,
                                    extra=exc.extra)
    if response.status in (429, 503):  # nothing placed, and the answer says retry: afresh
        await idempotency.give_back(app, claimed)
    else:
        sent = response.body if isinstance(response.body, bytes) else b""
        await idempotency.finish(app, claimed, response.status, sent)
    return response


async def _place(request: web.Request, call_id: str, agent: Agent, number: PhoneNumber,
                 to_number: str, body: PlaceCall,
                 before_dial: Callable[[], Awaitable[None]] | None = None) -> web.Response:
    """Take a call from the org's rate limit and place it; the answer (problems raised)."""
    app, org_id = request.app, agent.org_id
    if wait_s := app[CALL_RATE_LIMITER].take(org_id):
        return _rate_limited(request, wait_s)
    try:
        await place_outbound(app, call_id=call_id, agent=agent, number=number,
                             to_number=to_number, context=body.context, metadata=body.metadata,
                             before_dial=before_dial)
    except DialledNotRecorded:
        # The carrier is dialling (logged with why it is not recorded): a 500 would invite a
        # retry that rings the callee twice. Its webhooks carry our ids, so they still resolve.
        pass
    except idempotency.TakenOver as exc:
        # slow enough for a retry to take its key over: the retry dials, this request not
        log.warning("call %s: not dialled: %s", call_id, exc)
        app[CALL_RATE_LIMITER].give_back(org_id)
        _count(request, "idempotency_refused")
        raise Problem(409, "Conflict", f"this request was not processed in time: a retry with "
                      f"its {idempotency.HEADER} took it over and is answered with the call; "
                      "retry for its outcome", kind="idempotency-key-in-use",
                      extra={"call_id": call_id}) from exc
    except NotDialled as exc:
        log.warning("call %s: not dialled: %s", call_id, exc)
        app[CALL_RATE_LIMITER].give_back(org_id)  # no call was placed: its retry is not one more
        return _not_dialled(request, exc.unavailable, exc.kind)
    except CarrierUnavailable as exc:
        _count(request, "carrier_unavailable")
        raise Problem(503, "Service Unavailable", str(exc), kind="carrier-unavailable") from exc
    except DialError as exc:
        extra = {"call_id": call_id}
        if exc.caller_fault:
            _count(request, "carrier_rejected")
            raise Problem(422, "Unprocessable Content", f"{exc.carrier} refused the call: "
                          f"{exc.message}", kind="carrier-rejected", extra=extra) from exc
        _count(request, "carrier_error")
        raise Problem(502, "Bad Gateway", f"{exc.carrier} could not place the call: "
                      f"{exc.message}", kind="carrier-error", extra=extra) from exc
    _count(request, "dialing")
    return _json(CallCreated(call_id=call_id), status=201,
                 headers={"Location": f"{CALLS_PATH}/{call_id}"})


def _not_dialled(request: web.Request, unavailable: str = "the event bus",
                 kind: str = "bus-unavailable") -> web.Response:
    """503 for a call whose call.requested could not be published: the carrier was not asked.

    Or whose Idempotency-Key could not be marked dialling (``unavailable``: the database,
    ``kind`` ``store-unavailable``).
    """
    _count(request, "not_dialled")
    retry_after = retry_after_header(NOT_DIALLED_RETRY_AFTER_S)
    response = problem_response(
        503, "Service Unavailable", f"{unavailable} is unavailable, so the call was not dialled; "
        f"it is safe to retry (in {retry_after} s)", kind=kind,
        extra={"retry_after_s": int(retry_after)})
    response.headers["Retry-After"] = retry_after
    return response


def _rate_limited(request: web.Request, wait_s: float) -> web.Response:
    """429 for a call over the org's rate limit: nothing was published or dialled."""
    _count(request, "rate_limited")
    limiter = request.app[CALL_RATE_LIMITER]
    retry_after = retry_after_header(wait_s)
    response = problem_response(
        429, "Too Many Requests", f"your organisation may place {limiter.rate_per_s:g} calls "
        f"per second (bursts of up to {limiter.burst}); retry in {retry_after} s",
        kind="rate-limited", extra={"retry_after_s": int(retry_after)})
    response.headers["Retry-After"] = retry_after
    return response


_CALL_COLUMNS = ("call_id, agent_id, direction, from_number, to_number, carrier, "
                 "carrier_call_id, state, answered_by, end_reason, failure_reason, "
                 "requested_at, answered_at, ended_at, duration_s, turns")


async def get_call(request: web.Request) -> web.Response:
    """One of the org's calls."""
    key = await authenticate(request, "calls:read")
    call_id = request.match_info["call_id"]
    if not is_token(call_id):
        raise Problem(404, "Not Found", f"no call {call_id[:64]}", kind="unknown-call")
    async with request.app[POOL].connection() as conn:
        cursor = await conn.execute(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE call_id = %s AND org_id = %s",
            (call_id, key.org_id))
        row = await cursor.fetchone()
        view = _view(row) if row is not None else _pending_view(
            await find_by_call_id(conn, call_id), key.org_id)
    if view is None:
        raise Problem(404, "Not Found", f"no call {call_id}", kind="unknown-call")
    return _json(view)


def _view(row: tuple[Any, ...]) -> CallView:
    values = dict(zip(_CALL_COLUMNS.split(", "), row, strict=True))
    values["from_"] = values.pop("from_number")
    values["to"] = values.pop("to_number")
    return CallView(**values)


def _pending_view(call: CarrierCall | None, org_id: str) -> CallView | None:
    """A call the recorder has not projected yet, from the gateway's own bookkeeping."""
    if call is None or call.org_id != org_id:
        return None
    if call.ended_at is not None:
        state = "ended"
    elif call.answered_at is not None:
        state = "answered"
    else:
        state = "dialing" if call.direction == "outbound" else "requested"
    return CallView(call_id=call.call_id, agent_id=call.agent_id, direction=call.direction,
                    from_=call.from_number, to=call.to_number, carrier=call.carrier,
                    carrier_call_id=call.carrier_call_id, state=state,
                    end_reason=call.end_reason, requested_at=call.created_at,
                    answered_at=call.answered_at, ended_at=call.ended_at)
