"""Twilio's HTTP webhooks: voice (inbound + outbound answer), reconnect, status, AMD, recording.

Every handler checks the signature first, resolves the call through ``carrier_calls`` and emits
each call.* event at most once (see :mod:`parley.gateway.calls`), so Twilio's retries are
harmless. Unknown numbers get a spoken "not in service" and a hang-up with 200 rather than a
4xx: Twilio answers an error status by playing its generic "application error" message to the
caller and raising a debugger alert, which helps nobody; the refusal is logged and counted.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

from aiohttp import web
from multidict import MultiDictProxy

from parley.common.configuration import Agent, get_agent
from parley.common.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallMachineDetected,
    CallRecordingAvailable,
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
from ..keys import BUS, CALL_OUTBOXES, CLOCK, CONFIG, METRICS, POOL, TWILIO_REST
from ..replays import count_refusal, issue_connect, latest_connect
from . import twiml
from .signatures import signed_form

log = logging.getLogger(__name__)

CARRIER: Final = "twilio"
_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")  # matched whole (fullmatch)
_FAILED_STATUSES = {"busy": "busy", "no-answer": "no_answer", "failed": "failed",
                    "canceled": "canceled"}
_ANSWERED_BY = {"human", "machine_start", "machine_end_beep", "machine_end_silence",
                "machine_end_other", "fax", "unknown"}


def add_routes(app: web.Application) -> None:
    """Register the Twilio webhooks."""
    app.router.add_post("/twilio/voice", voice)
    app.router.add_post(twiml.RECONNECT_PATH, reconnect)
    app.router.add_post("/twilio/status", status)
    app.router.add_post("/twilio/amd", amd)
    app.router.add_post("/twilio/recording", recording)


def _xml(document: str) -> web.Response:
    return web.Response(text=document, content_type="application/xml")


def _count(request: web.Request, outcome: str) -> None:
    request.app[METRICS].counter("gateway_webhooks", "Carrier webhooks handled, by outcome",
                                 ["route", "outcome"]).labels(request.path, outcome).inc()


def _required(form: MultiDictProxy[str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise Problem(400, "Bad Request", f"missing form field {name}", kind="invalid-webhook")
    if name == "CallSid" and not _CALL_SID.fullmatch(value):
        raise Problem(400, "Bad Request", "CallSid is not CA followed by 32 hex digits",
                      kind="invalid-webhook")
    return value


async def voice(request: web.Request) -> web.Response:
    """A call to answer: inbound to one of our numbers, or an outbound call picked up."""
    form = await signed_form(request)
    call_sid = _required(form, "CallSid")
    if form.get("Direction", "inbound").startswith("outbound"):
        call, agent = await _outbound_call(request, form, call_sid)
    else:
        found = await open_inbound_call(
            request.app[POOL], request.app[BUS], carrier=CARRIER, carrier_call_id=call_sid,
            to_number=form.get("To", ""), from_number=form.get("From", ""))
        if found is None:
            _count(request, "unknown_number")
            return _xml(twiml.say_and_hangup(twiml.NOT_IN_SERVICE))
        call, agent = found
    if call.ended:
        _count(request, "already_ended")
        return _xml(twiml.hangup_twiml())
    app = request.app
    async with app[POOL].connection() as conn:  # connect 0, the call's first stream's token
        issued = await issue_connect(conn, app, call.call_id, 0, again=True)
    if issued is None:  # its stream started, or the call moved on: a replay
        return _stale(request, call)
    await publish_answered(app[POOL], app[BUS], call.call_id,
                           CallAnswered(org_id=call.org_id, call_id=call.call_id))
    _count(request, "connected")
    return _xml(twiml.connect_twiml(app[CONFIG], agent.settings, call_id=call.call_id,
                                    org_id=call.org_id, agent_id=call.agent_id, issued=issued))


def _stale(request: web.Request, call: CarrierCall) -> web.Response:
    """A replayed voice or reconnect webhook: a hang-up for whoever sent it, nothing done.

    Twilio itself never asks again for a connect whose stream started or was replaced (it
    executes the TwiML it has), so the answer only reaches the replayer.
    """
    count_refusal(request.app, CARRIER, request.path, "stale_connect")
    _count(request, "stale")
    log.warning("call %s: refused a replayed %s webhook from %s (connect %s is not the "
                "call's latest, or its stream already started)", call.call_id, request.path,
                request.remote or "-", request.query.get("connect", "(none)")[:12])
    return _xml(twiml.hangup_twiml())


def _connect_number(request: web.Request) -> int:
    """The connect a ``<Connect action>`` is about; -1 for TwiML issued before connects were."""
    value = request.query.get("connect", "")
    if not value:
        return -1
    if not value.isdigit() or len(value) > 9:
        raise Problem(400, "Bad Request", "connect is not a connect number",
                      kind="invalid-webhook")
    return int(value)


async def _outbound_call(request: web.Request, form: MultiDictProxy[str],
                         call_sid: str) -> tuple[CarrierCall, Agent]:
    call = await _resolve(request, form, call_sid)
    async with request.app[POOL].connection() as conn:
        agent = await get_agent(conn, call.agent_id, org_id=call.org_id)
    if agent is None:
        raise Problem(404, "Not Found", f"agent {call.agent_id} of call {call.call_id} is gone",
                      kind="unknown-agent")
    return call, agent


async def _resolve(request: web.Request, form: MultiDictProxy[str],
                   call_sid: str) -> CarrierCall:
    """The call a webhook is about: by CallSid, else from the ids in the (signed) query.

    The outbound API puts ``call_id``/``org_id``/``agent_id`` in every callback URL it gives
    Twilio; a callback that overtakes the API's own insert records the mapping itself.
    """
    query = request.query
    async with request.app[POOL].connection() as conn:
        call = await find_by_carrier_id(conn, CARRIER, call_sid)
        if call is not None:
            return call
        ids = [query.get(name, "") for name in ("call_id", "org_id", "agent_id")]
        if not all(is_token(value) for value in ids):
            raise Problem(404, "Not Found", f"unknown call {call_sid}", kind="unknown-call")
        outbound = form.get("Direction", "outbound-api").startswith("outbound")
        call, _ = await record_carrier_call(conn, CarrierCall(
            carrier=CARRIER, carrier_call_id=call_sid, call_id=ids[0], org_id=ids[1],
            agent_id=ids[2], direction="outbound" if outbound else "inbound",
            from_number=form.get("From", ""), to_number=form.get("To", "")))
    if call.carrier_call_id != call_sid:
        raise Problem(409, "Conflict", f"call {call.call_id} belongs to another CallSid",
                      kind="call-mismatch")
    return call


async def reconnect(request: web.Request) -> web.Response:
    """``<Connect action>``: the socket ended while the call may still be live.

    The action names its connect (``connect=<n>``) and brings the call to connect n+1. Only the
    call's latest connect may: an action of an older one (replaced already, by this very action
    answered before or by a DTMF redirect) is a replay — it reconnects nothing, counts no
    attempt and ends no call (:func:`_stale`). Twilio asks an action once (no retries are
    configured), so a second request for it is never Twilio's.
    """
    form = await signed_form(request)
    call_sid = _required(form, "CallSid")
    number = _connect_number(request)
    app = request.app
    async with app[POOL].connection() as conn:
        call_id = request.query.get("call_id", "")
        call = await find_by_call_id(conn, call_id) if is_token(call_id) else None
        if call is None or call.carrier_call_id != call_sid:
            _count(request, "unknown_call")
            return _xml(twiml.hangup_twiml())
        if call.ended:
            _count(request, "already_ended")
            return _xml(twiml.hangup_twiml())
        latest = await latest_connect(conn, call.call_id)
        if number == -1 and not app[CONFIG].gateway_stream_tokens_enforced:
            number = latest  # the older code's TwiML, in a mixed fleet (config.py)
        if latest != number:
            return _stale(request, call)
        attempts = await count_milestones(conn, call.call_id, "reconnect:")
        agent = await get_agent(conn, call.agent_id, org_id=call.org_id)
    if agent is None or attempts >= app[CONFIG].max_reconnects:
        log.warning("call %s: not reconnecting (attempt %d, agent %s)", call.call_id,
                    attempts + 1, "ok" if agent else "gone")
        await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
            org_id=call.org_id, call_id=call.call_id, reason="error",
            duration_s=seconds_since(call.answered_at, app[CLOCK]())))
        _count(request, "gave_up")
        return _xml(twiml.hangup_twiml())
    async with app[POOL].connection() as conn:
        issued = await issue_connect(conn, app, call.call_id, number + 1)
        if issued is None:  # another request for it came first
            return _stale(request, call)
        await claim_milestone(conn, call.call_id, f"reconnect:{number + 1}")
    _count(request, "reconnected")
    log.info("call %s: reconnecting to a new stream (attempt %d)", call.call_id, attempts + 1)
    return _xml(twiml.connect_twiml(app[CONFIG], agent.settings, call_id=call.call_id,
                                    org_id=call.org_id, agent_id=call.agent_id,
                                    issued=issued, greet=False))


async def status(request: web.Request) -> web.Response:
    """Call progress: ringing, answered, completed, or a failure."""
    form = await signed_form(request)
    call = await _resolve(request, form, _required(form, "CallSid"))
    app, state = request.app, form.get("CallStatus", "")
    pool, bus, org_id, call_id = app[POOL], app[BUS], call.org_id, call.call_id
    if state == "ringing":
        await publish_once(pool, bus, call_id, "ringing",
                           CallRinging(org_id=org_id, call_id=call_id))
    elif state in ("in-progress", "answered"):
        await publish_answered(pool, bus, call_id, CallAnswered(org_id=org_id, call_id=call_id))
    elif state == "completed":
        await publish_end(pool, app[CALL_OUTBOXES], CallEnded(
            org_id=org_id, call_id=call_id, reason="completed",
            duration_s=_number(form.get("CallDuration", "0"))))
    elif state in _FAILED_STATUSES:
        await publish_end(pool, app[CALL_OUTBOXES], CallFailed(
            org_id=org_id, call_id=call_id, reason=_FAILED_STATUSES[state],
            carrier_status=state))
    elif state not in ("queued", "initiated"):
        log.warning("call %s: ignoring unknown CallStatus %r", call.call_id, state)
    _count(request, state if state in _KNOWN_STATUSES else "other")
    return web.Response(status=204)


_KNOWN_STATUSES = {"queued", "initiated", "ringing", "in-progress", "answered", "completed",
                   *_FAILED_STATUSES}


async def amd(request: web.Request) -> web.Response:
    """Async answering-machine detection: apply the agent's machine policy."""
    form = await signed_form(request)
    call = await _resolve(request, form, _required(form, "CallSid"))
    answered_by = form.get("AnsweredBy", "")
    if answered_by not in _ANSWERED_BY:
        raise Problem(400, "Bad Request", f"unknown AnsweredBy {answered_by!r}",
                      kind="invalid-webhook")
    app = request.app
    async with app[POOL].connection() as conn:
        agent = await get_agent(conn, call.agent_id, org_id=call.org_id)
    human = answered_by in ("human", "unknown")
    action = "continue" if human or agent is None else agent.settings.machine_policy
    event = CallMachineDetected(org_id=call.org_id, call_id=call.call_id,
                                answered_by=answered_by,  # type: ignore[arg-type]
                                action=action)
    if not await publish_once(app[POOL], app[BUS], call.call_id, "amd", event):
        _count(request, "duplicate")
        return web.Response(status=204)
    if action != "continue" and agent is not None:
        await _act_on_machine(request, call, agent, action)
    _count(request, answered_by)
    return web.Response(status=204)


async def _act_on_machine(request: web.Request, call: CarrierCall, agent: Agent,
                          action: str) -> None:
    app, rest = request.app, request.app[TWILIO_REST]
    message = agent.settings.voicemail_message if action == "leave_message" else ""
    if rest is None or (action == "leave_message" and not message):
        log.info("call %s: machine policy %s left to the agent (no REST client or message)",
                 call.call_id, action)
        return
    ended = await publish_end(app[POOL], app[CALL_OUTBOXES], CallEnded(
        org_id=call.org_id, call_id=call.call_id, reason="machine",
        duration_s=seconds_since(call.answered_at, app[CLOCK]())))
    if not ended:
        return
    try:
        if message:
            await rest.redirect(call.carrier_call_id, twiml.say_and_hangup(
                message, language=agent.settings.language, voice=agent.settings.voice))
        else:
            await rest.hangup(call.carrier_call_id)
    except Exception:  # AMD callbacks are not retried: say so loudly, answer 204 anyway
        log.exception("call %s: machine policy %s failed at Twilio", call.call_id, action)


async def recording(request: web.Request) -> web.Response:
    """A finished recording: tell postcall where to fetch it."""
    form = await signed_form(request)
    call = await _resolve(request, form, _required(form, "CallSid"))
    sid, url = _required(form, "RecordingSid"), _required(form, "RecordingUrl")
    state = form.get("RecordingStatus", "completed")
    if state != "completed":
        log.warning("call %s: recording %s is %s", call.call_id, sid, state)
        _count(request, "not_completed")
        return web.Response(status=204)
    event = CallRecordingAvailable(org_id=call.org_id, call_id=call.call_id, recording_sid=sid,
                                   url=url, duration_s=_number(form.get("RecordingDuration",
                                                                        "0")))
    published = await publish_once(request.app[POOL], request.app[BUS], call.call_id,
                                   f"recording:{sid}", event)
    _count(request, "recorded" if published else "duplicate")
    return web.Response(status=204)


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number >= 0 and number != float("inf") else 0.0
