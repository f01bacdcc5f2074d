"""Placing an outbound call: what ``POST /v1/calls`` and a due callback both do.

Publish call.requested, ask the carrier that owns the ``from`` number to dial
(:func:`parley.gateway.api.dialing.dial`), then record the carrier's id in ``carrier_calls`` and
publish call.dialing in one transaction. A carrier that refuses publishes call.failed and the
refusal is raised for the caller to answer as it must (an HTTP problem, a callback's retry); so
does one that never answered (``DialError.ambiguous``: it may have placed the call).
When call.requested cannot be published (NATS down), nothing is dialled: :class:`NotDialled`;
nor when the caller's ``before_dial`` (the API's Idempotency-Key, marked dialling) fails, the
call it requested then failed.

Once the carrier has said it is dialling, the call exists whatever happens next: recording it
(``carrier_calls`` and call.dialing, both idempotent: the insert skips a known call, the event
has a stable id) is retried through a database or bus outage (a Postgres restart drops every
connection) rather than reported as a failed dial, which a caller might dial again. Only when
it still fails after :data:`RECORD_RETRY_DELAYS_S` is :class:`DialledNotRecorded` raised.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from aiohttp import web
from psycopg_pool import PoolTimeout

from parley.common.configuration import Agent, PhoneNumber
from parley.common.events import CallDialing, CallFailed, CallRequested

from .api.dialing import CarrierUnavailable, DialError, dial
from .calls import CarrierCall, record_carrier_call
from .keys import BUS, POOL

log = logging.getLogger(__name__)


T = TypeVar("T")

# Between tries of a write that must not be lost once the carrier dialled: about half a minute
# in all, a database restart's worth, and well within the two minutes after which a callback
# still dialing is taken for interrupted.
RECORD_RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0)
_DIALING_IDS = uuid.UUID("5d0c8b8e-8f0c-4b8e-9d8a-0c5a1d1a9e11")
_NOT_DIALLED_IDS = uuid.UUID("8b1f3c2e-6a4d-4f0e-9c7b-2d5e1a9f4c30")


def not_dialled_event_id(call_id: str) -> uuid.UUID:
    """The id of the call.failed published for a call whose ``before_dial`` failed.

    Only then, and so only for a call the carrier was never asked to dial: the event store
    holding it is proof that ``call_id`` was not dialled (an Idempotency-Key left marked
    dialling by such a request can be taken over by its retry).
    """
    return uuid.uuid5(_NOT_DIALLED_IDS, call_id)


class NotDialled(Exception):
    """The carrier was not asked to dial.

    call.requested could not be published (or ``before_dial`` failed); ``unavailable`` names
    what was missing.
    """

    def __init__(self, message: str, *, unavailable: str = "the event bus",
                 kind: str = "bus-unavailable") -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.kind = kind  # the problem type of the API's 503


class DialledNotRecorded(Exception):
    """The carrier is dialling ``call``, but recording it failed, even when tried again."""

    def __init__(self, call: CarrierCall, cause: BaseException) -> None:
        super().__init__(f"{call.carrier} is dialling (carrier id {call.carrier_call_id}), but "
                         f"recording it failed: {cause!r}")
        self.call = call


def transient(exc: BaseException) -> bool:
    """Whether a write may succeed if tried again: the database or the bus was unreachable."""
    if isinstance(exc, psycopg.Error):
        return isinstance(exc, psycopg.OperationalError)
    return isinstance(exc, PoolTimeout | OSError | TimeoutError) or (
        type(exc).__module__.startswith("nats."))


async def retried(write: Callable[[int], Awaitable[T]], what: str) -> T:
    """Await ``write(attempt)``, again after each of :data:`RECORD_RETRY_DELAYS_S`.

    Only while what it raises is :func:`transient`; the last failure is raised.
    """
    for attempt, delay in enumerate((*RECORD_RETRY_DELAYS_S, None)):
        try:
            return await write(attempt)
        except Exception as exc:
            if delay is None or not transient(exc):
                raise
            log.warning("%s failed (%r); trying again in %g s", what, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def place_outbound(app: web.Application, *, call_id: str, agent: Agent,
                         number: PhoneNumber, to_number: str, context: dict[str, Any],
                         metadata: dict[str, str],
                         before_dial: Callable[[], Awaitable[None]] | None = None,
                         ) -> CarrierCall:
    """Have ``agent`` call ``to_number`` from ``number``; the call once the carrier is dialing.

    Raises :class:`DialError` or :class:`CarrierUnavailable` (call.failed published) when the
    carrier did not place the call, :class:`NotDialled` when it was not asked to (also when
    ``before_dial``, awaited just before the carrier is asked, raises: the exception itself if
    a :class:`NotDialled`), and :class:`DialledNotRecorded` when it did but recording that
    failed, tried again.
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
    if before_dial is not None:
        try:
            await before_dial()
        except Exception as exc:  # not dialled: the call requested fails
            not_dialled = exc if isinstance(exc, NotDialled) else NotDialled(
                f"not dialled: {exc!r}", unavailable="the database", kind="store-unavailable")
            try:
                reason = (f"not dialled: {exc}" if isinstance(exc, NotDialled)
                          else "not dialled: could not record that it dials")
                await bus.publish(CallFailed(id=not_dialled_event_id(call_id),
                                             org_id=call.org_id, call_id=call_id,
                                             reason=reason[:500]))
            except Exception:
                log.exception("call %s: not dialled, and its call.failed not published",
                              call_id)
            if not_dialled is exc:
                raise
            raise not_dialled from exc
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
    dialing = CallDialing(id=uuid.uuid5(_DIALING_IDS, call_id), org_id=call.org_id,
                          call_id=call_id, carrier_call_id=call.carrier_call_id)

    async def record(attempt: int) -> None:
        async with app[POOL].connection() as conn, conn.transaction():
            await record_carrier_call(conn, call)
            await bus.publish(dialing)

    try:
        await retried(record, f"call {call_id}: recording that {call.carrier} is dialling")
    except Exception as exc:
        log.exception("call %s: %s is dialling %s, but recording it failed", call_id,
                      call.carrier, to_number)
        raise DialledNotRecorded(call, exc) from exc
    log.info("call %s: %s dialing %s for agent %s", call_id, call.carrier, to_number,
             agent.agent_id)
    return call
