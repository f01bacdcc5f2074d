"""Placing an outbound call: what ``POST /v1/calls`` and a due callback both do.

Publish call.requested, ask the carrier that owns the ``from`` number to dial
(:func:`parley.gateway.api.dialing.dial`), then record the carrier's id in ``carrier_calls`` and
publish call.dialing in one transaction. A carrier that refuses publishes call.failed and the
refusal is raised for the caller to answer as it must (an HTTP problem, a callback's retry); so
does one that never answered (``DialError.ambiguous``: it may have placed the call).
When call.requested cannot be published (NATS down), nothing is dialled: :class:`NotDialled`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from parley.common.configuration import Agent, PhoneNumber
from parley.common.events import CallDialing, CallFailed, CallRequested

from .api.dialing import CarrierUnavailable, DialError, dial
from .calls import CarrierCall, record_carrier_call
from .keys import BUS, POOL

log = logging.getLogger(__name__)


class NotDialled(Exception):
    """call.requested could not be published, so the carrier was not asked to dial."""


async def place_outbound(app: web.Application, *, call_id: str, agent: Agent,
                         number: PhoneNumber, to_number: str, context: dict[str, Any],
                         metadata: dict[str, str]) -> CarrierCall:
    """Have ``agent`` call ``to_number`` from ``number``; the call once the carrier is dialing.

    Raises :class:`DialError` or :class:`CarrierUnavailable` (call.failed published) when the
    carrier did not place the call, :class:`NotDialled` when it was not asked to.
    """
    call = CarrierCall(carrier=number.carrier, carrier_call_id="", call_id=call_id,
                       org_id=agent.org_id, agent_id=agent.agent_id, direction="outbound",
                       from_number=number.number, to_number=to_number)
    bus = app[BUS]
    try:
        await bus.publish(CallRequested(
            org_id=call.org_id, call_id=call_id, direction="outbound", agent_id=agent.agent_id,
            from_number=number.number, to_number=to_number, carrier=number.carrier,
            context=context, metadata=metadata))
    except Exception as exc:
        raise NotDialled(f"call.requested not published: {exc!r}") from exc
    try:
        call.carrier_call_id = await dial(app, carrier=call.carrier, call_id=call_id,
                                          agent=agent, from_number=call.from_number,
                                          to_number=to_number)
    except CarrierUnavailable as exc:
        await bus.publish(CallFailed(org_id=call.org_id, call_id=call_id,
                                     reason=str(exc)[:500]))
        raise
    except DialError as exc:
        await bus.publish(CallFailed(org_id=call.org_id, call_id=call_id,
                                     reason=exc.message[:500], carrier_status=exc.status))
        log.warning("call %s: %s %s %s: %s", call_id, exc.carrier, "may have dialled"
                    if exc.ambiguous else "refused to dial", to_number, exc.message)
        raise
    async with app[POOL].connection() as conn, conn.transaction():
        await record_carrier_call(conn, call)
        await bus.publish(CallDialing(org_id=call.org_id, call_id=call_id,
                                      carrier_call_id=call.carrier_call_id))
    log.info("call %s: %s dialing %s for agent %s", call_id, call.carrier, to_number,
             agent.agent_id)
    return call
