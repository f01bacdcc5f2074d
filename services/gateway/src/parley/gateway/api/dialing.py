"""Placing an outbound call with the carrier that owns the ``from`` number.

Twilio through the twilio SDK's client of :data:`parley.gateway.keys.TWILIO_REST` (async, its
API base URL set from ``twilio_api_base_url``), Plivo through
:class:`parley.gateway.plivo.rest.PlivoCalls` (the sync SDK in a thread, its base URL set from
``plivo_api_base_url``). Every callback URL carries our call, org and agent ids, so a callback
that overtakes the API's own bookkeeping can still be resolved.

A carrier refusal becomes :class:`DialError`: ``caller_fault`` when the request itself was bad
(an invalid or unreachable number: Twilio 400/404/422, Plivo validation errors), else ours or
the carrier's (credentials, outages). A request the carrier never answered (a timeout, the
connection lost once it was sent) is ``ambiguous``: the carrier may have placed the call, so
dialling again could ring the number twice. One that never reached it (no connection) is not.
"""

from __future__ import annotations

from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from twilio.base.exceptions import (
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)

from parley.common.configuration import Agent

from ..config import GatewayConfig
from ..keys import CONFIG, TWILIO_REST
from ..plivo import xml as plivo_xml
from ..plivo.rest import PLIVO_REST, PlivoCallError

TWILIO_STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
_TWILIO_CALLER_STATUSES = {400, 404, 422}


class DialError(Exception):
    """The carrier did not place the call, or (``ambiguous``) did not say whether it did."""

    def __init__(self, carrier: str, message: str, *, caller_fault: bool,
                 status: str = "", ambiguous: bool = False) -> None:
        super().__init__(f"{carrier}: {message}")
        self.carrier = carrier
        self.message = message
        self.caller_fault = caller_fault
        self.status = status
        self.ambiguous = ambiguous


class CarrierUnavailable(Exception):
    """No account is configured for the carrier that owns the number."""


def _urls(config: GatewayConfig, query: dict[str, str], *paths: str) -> list[str]:
    suffix = "?" + urlencode(query)
    return [config.public_base + path + suffix for path in paths]


async def dial(app: web.Application, *, carrier: str, call_id: str, agent: Agent,
               from_number: str, to_number: str) -> str:
    """Ask the carrier to place the call; returns the carrier's id for it."""
    ids = {"call_id": call_id, "org_id": agent.org_id, "agent_id": agent.agent_id}
    if carrier == "plivo":
        return await _dial_plivo(app, ids, agent, from_number, to_number)
    return await _dial_twilio(app, ids, agent, from_number, to_number)


async def _dial_twilio(app: web.Application, ids: dict[str, str], agent: Agent,
                       from_number: str, to_number: str) -> str:
    rest = app[TWILIO_REST]
    if rest is None:
        raise CarrierUnavailable("no Twilio account is configured")
    voice, status, amd, recording = _urls(app[CONFIG], ids, "/twilio/voice", "/twilio/status",
                                          "/twilio/amd", "/twilio/recording")
    try:
        call = await rest.client.calls.create_async(
            to=to_number, from_=from_number, url=voice, method="POST",
            status_callback=status, status_callback_method="POST",
            status_callback_event=TWILIO_STATUS_EVENTS,
            machine_detection="Enable", async_amd="true", async_amd_status_callback=amd,
            async_amd_status_callback_method="POST",
            record=agent.settings.record, recording_status_callback=recording,
            recording_status_callback_method="POST",
            time_limit=agent.settings.max_duration_s)
    except TwilioRestException as exc:
        raise DialError("twilio", exc.msg or f"HTTP {exc.status}",
                        caller_fault=exc.status in _TWILIO_CALLER_STATUSES,
                        status=str(exc.code or exc.status)) from exc
    except TwilioServiceException as exc:  # the RFC 9457 error format
        raise DialError("twilio", exc.detail or exc.title,
                        caller_fault=exc.status in _TWILIO_CALLER_STATUSES,
                        status=str(exc.code or exc.status)) from exc
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # not sent
        raise DialError("twilio", str(exc) or type(exc).__name__, caller_fault=False) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:  # sent, and no answer came back
        raise DialError("twilio", str(exc) or type(exc).__name__, caller_fault=False,
                        ambiguous=True) from exc
    except TwilioException as exc:
        raise DialError("twilio", str(exc) or type(exc).__name__, caller_fault=False) from exc
    if not call.sid:
        raise DialError("twilio", "Twilio accepted the call without a sid", caller_fault=False,
                        ambiguous=True)
    return str(call.sid)


async def _dial_plivo(app: web.Application, ids: dict[str, str], agent: Agent,
                      from_number: str, to_number: str) -> str:
    rest = app[PLIVO_REST]
    if rest is None:
        raise CarrierUnavailable("no Plivo account is configured")
    answer, hangup, ring = _urls(app[CONFIG], ids, plivo_xml.ANSWER_PATH,
                                 plivo_xml.HANGUP_PATH, plivo_xml.RING_PATH)
    try:
        dialed = await rest.dial(from_number=from_number, to_number=to_number,
                                 answer_url=answer, hangup_url=hangup, ring_url=ring,
                                 time_limit_s=agent.settings.max_duration_s)
    except PlivoCallError as exc:
        raise DialError("plivo", str(exc), caller_fault=exc.caller_fault,
                        ambiguous=exc.ambiguous) from exc
    return dialed.request_uuid
