"""Plivo's HTTP callbacks: answer, ring, hangup, stream status, and the transfer XML.

The answer URL serves inbound calls, outbound calls picked up, and reconnects.

Every handler checks the V3 signature first, resolves the call through ``carrier_calls`` and
emits each call.* event at most once (see :mod:`parley.gateway.calls`), so Plivo's retries are
harmless. As for Twilio, an unknown number is answered with a spoken refusal and a hang-up
rather than a 4xx, which the caller would only hear as a carrier error.

Outbound calls: the API records the call under Plivo's ``RequestUUID`` (all that
``calls.create`` returns) and puts our ids in every callback URL; the first callback that
carries the ``CallUUID`` re-keys the row to it, which is the id the stream's ``start`` names.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from aiohttp import web
from multidict import MultiDictProxy

from parley.common.configuration import get_agent
from parley.common.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallRinging,
    is_token,
)
from parley.common.problems import Problem

from ..calls import (
    CarrierCall,
    claim_milestone,
    count_milestones,
    find_by_call_id,
    find_by_carrier_id,
    open_inbound_call,
    publish_answered,
    publish_end,
    publish_once,
    record_carrier_call,
    seconds_since,
)
from ..commands import E164_NUMBER
from ..keys import BUS, CALL_OUTBOXES, CLOCK, CONFIG, METRICS, POOL
from . import xml
from .signatures import CARRIER, signed_form

log = logging.getLogger(__name__)

# Plivo's CallStatus on hang-up for calls that never connected → call.failed reason.
_FAILED_STATUSES = {"busy": "busy", "no-answer": "no_answer", "timeout": "no_answer",
                    "failed": "failed", "cancel": "canceled", "canceled": "canceled"}
_STREAM_EVENTS = {"StartStream", "StopStream", "DroppedStream"}
EndReason = Literal["caller_hangup", "agent_hangup", "completed", "error"]


def add_routes(app: web.Application) -> None:
    """Register the Plivo callbacks."""
    app.router.add_post(xml.ANSWER_PATH, answer)
    app.router.add_post(xml.RING_PATH, ring)
    app.router.add_post(xml.HANGUP_PATH, hangup)
    app.router.add_post(xml.STREAM_STATUS_PATH, stream_status)
    app.router.add_post(xml.TRANSFER_PATH, transfer)


def _xml(document: str) -> web.Response:
    return web.Response(text=document, content_type="application/xml")


def _count(request: web.Request, outcome: str) -> None:
    request.app[METRICS].counter("gateway_webhooks", "Carrier webhooks handled, by outcome",
                                 ["route", "outcome"]).labels(request.path, outcome).inc()


def _required(form: MultiDictProxy[str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise Problem(400, "Bad Request", f"missing form field {name}", kind="invalid-webhook")
    return value


async def answer(request: web.Request) -> web.Response:
    """The call was picked up: connect it to our audio stream."""
    form = await signed_form(request)
    call_uuid = _required(form, "CallUUID")
    if "call_id" in request.query or form.get("Direction", "inbound") == "outbound":
        call = await resolve(request, form, call_uuid)
        async with request.app[POOL].connection() as conn:
            agent = await get_agent(conn, call.agent_id, org_id=call.org_id)
        if agent is None:
            raise Problem(404, "Not Found", f"agent {call.agent_id} of call {call.call_id} "
                          "is gone", kind="unknown-agent")
    else:
        found = await open_inbound_call(
            request.app[POOL], request.app[BUS], carrier=CARRIER, carrier_call_id=call_uuid,
            to_number=form.get("To", ""), from_number=form.get("From", ""))
        if found is None:
            _count(request, "unknown_number")
            return _xml(xml.speak_and_hangup(xml.NOT_IN_SERVICE))
        call, agent = found
    if call.ended:
        _count(request, "already_ended")
        return _xml(xml.hangup_xml())
    app = request.app
    # A reconnect comes through our <Redirect>, whose URL says so. A call's first answer asked
    # again (Plivo retrying an answer of ours that was slow: an inbound call's URL names no
    # call, an outbound call's names it as every URL we dial with does) is answered the same,
    # and uses up none of the call's reconnects.
    reconnecting = call.answered_at is not None and "reconnect" in request.query
    if reconnecting and not await _may_reconnect(request, call):
        _count(request, "gave_up")
        return _xml(xml.hangup_xml())
    await publish_answered(app[POOL], app[BUS], call.call_id,
                           CallAnswered(org_id=call.org_id, call_id=call.call_id))
    _count(request, "connected")
    return _xml(xml.stream_xml(app[CONFIG], agent.settings, call_id=call.call_id))


async def _may_reconnect(request: web.Request, call: CarrierCall) -> bool:
    """Reconnect a live call whose socket closed (the ``<Redirect>``), or end it.

    Up to ``max_reconnects`` times; after that the call ends with reason ``error``.
    """
    app = request.app
    async with app[POOL].connection() as conn:
        attempts = await count_milestones(conn, call.call_id, "reconnect:")
        if attempts < app[CONFIG].max_reconnects:
            await claim_milestone(conn, call.call_id, f"reconnect:{attempts + 1}")
            log.info("plivo call %s: reconnecting to a new stream (attempt %d)", call.call_id,
                     attempts + 1)
            return True
    log.warning("plivo call %s: not reconnecting after %d attempts", call.call_id, attempts)
    await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
        org_id=call.org_id, call_id=call.call_id, reason="error",
        duration_s=seconds_since(call.answered_at, app[CLOCK]())))
    return False


async def resolve(request: web.Request, form: MultiDictProxy[str],
                  call_uuid: str) -> CarrierCall:
    """The call a callback is about: by ``CallUUID``, else by the ids in the (signed) query.

    A row still keyed by the ``RequestUUID`` of an outbound call is re-keyed to the
    ``CallUUID``; a callback that overtook the API's own insert records the mapping itself.
    """
    async with request.app[POOL].connection() as conn:
        call = await find_by_carrier_id(conn, CARRIER, call_uuid)
        if call is not None:
            return call
        ids = [request.query.get(name, "") for name in ("call_id", "org_id", "agent_id")]
        if not is_token(ids[0]):
            raise Problem(404, "Not Found", f"unknown call {call_uuid}", kind="unknown-call")
        call = await find_by_call_id(conn, ids[0])
        request_uuid = form.get("RequestUUID", "")
        if call is not None and request_uuid and call.carrier_call_id == request_uuid:
            await conn.execute(
                "UPDATE carrier_calls SET carrier_call_id = %s WHERE carrier = %s "
                "AND call_id = %s AND carrier_call_id = %s",
                (call_uuid, CARRIER, call.call_id, request_uuid))
            call.carrier_call_id = call_uuid
        elif call is None and all(is_token(value) for value in ids):
            call, _ = await record_carrier_call(conn, CarrierCall(
                carrier=CARRIER, carrier_call_id=call_uuid, call_id=ids[0], org_id=ids[1],
                agent_id=ids[2], direction="outbound", from_number=form.get("From", ""),
                to_number=form.get("To", "")))
        elif call is None:
            raise Problem(404, "Not Found", f"unknown call {call_uuid}", kind="unknown-call")
    if call.carrier != CARRIER or call.carrier_call_id != call_uuid:
        raise Problem(409, "Conflict", f"call {call.call_id} belongs to another CallUUID",
                      kind="call-mismatch")
    return call


async def ring(request: web.Request) -> web.Response:
    """The far end of an outbound call is ringing."""
    form = await signed_form(request)
    call = await resolve(request, form, _required(form, "CallUUID"))
    published = await publish_once(request.app[POOL], request.app[BUS], call.call_id,
                                   "ringing", CallRinging(org_id=call.org_id,
                                                          call_id=call.call_id))
    _count(request, "ringing" if published else "duplicate")
    return web.Response(status=204)


async def hangup(request: web.Request) -> web.Response:
    """The call is over: call.ended (or call.failed if it never connected), once."""
    form = await signed_form(request)
    call = await resolve(request, form, _required(form, "CallUUID"))
    status = form.get("CallStatus", "completed")
    event: CallEnded | CallFailed
    if status in _FAILED_STATUSES and call.answered_at is None:
        event = CallFailed(org_id=call.org_id, call_id=call.call_id,
                           reason=_FAILED_STATUSES[status], carrier_status=status)
    else:
        event = CallEnded(org_id=call.org_id, call_id=call.call_id,
                          reason=_end_reason(call, form),
                          duration_s=_number(form.get("Duration", "0")))
    published = await publish_end(request.app[POOL], request.app[CALL_OUTBOXES], event)
    _count(request, status if published else "duplicate")
    return web.Response(status=204)


def _end_reason(call: CarrierCall, form: MultiDictProxy[str]) -> EndReason:
    """Who hung up, from Plivo's ``HangupSource``: Caller (the A leg) or Callee (the B leg)."""
    source = form.get("HangupSource", "")
    party = "Caller" if call.direction == "inbound" else "Callee"
    if source == party:
        return "caller_hangup"
    if source in ("API Request", "Plivo"):
        return "agent_hangup"
    if source == "Error":
        return "error"
    return "completed"


async def stream_status(request: web.Request) -> web.Response:
    """The stream's lifecycle (StartStream, StopStream, DroppedStream): logged and counted.

    No event: the socket itself emits call.stream_started, and a stream that ends or drops
    takes the call down with it (``keepCallAlive``), which the hangup callback reports.
    """
    form = await signed_form(request)
    event = form.get("Event", "")
    call_id = request.query.get("call_id", "")
    if event == "DroppedStream":
        log.warning("plivo call %s: stream %s dropped: %s", call_id, form.get("StreamID", ""),
                    form.get("Error", "") or form.get("Reason", "") or "no reason given")
    else:
        log.info("plivo call %s: stream %s %s", call_id, form.get("StreamID", ""), event)
    _count(request, event if event in _STREAM_EVENTS else "other")
    return web.Response(status=204)


async def transfer(request: web.Request) -> web.Response:
    """The XML a transferred call runs: dial the number in our own (signed) URL."""
    await signed_form(request)
    to = request.query.get("to", "")
    if not E164_NUMBER.fullmatch(to):
        raise Problem(400, "Bad Request", f"transfer needs an E.164 number, not {to!r}",
                      kind="invalid-webhook")
    _count(request, "transferred")
    return _xml(xml.dial_xml(to))


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if 0 <= number != float("inf") else 0.0
