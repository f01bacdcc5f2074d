"""After a redirect that brings the call back to a new stream (DTMF): wait for that stream.

Sending DTMF replaces the call's TwiML with ``<Play digits>`` and then ``<Connect><Stream>``,
so Twilio stops the stream and the call lives on in the next one, which may start on any
gateway instance. A caller who hangs up while the digits play gets no next stream, and an
inbound call has no status callback of ours to report the end: nothing else would ever
publish call.ended. So once the digits have had time to play and the next stream
``gateway_carrier_reconnect_wait_s`` to start, the call's last ``call.stream_started`` on the bus
(or its end in ``carrier_calls``) says whether it came back; if not, Twilio says whether the
call is over (the caller hung up) or still up with no stream (hung up, reason ``error``).

A gateway that stops waits no longer (once it is gone, nothing would end the call) and decides
at once, except for a call Twilio still has in progress: its digits are most likely still
playing, and its next stream will start on another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from nats.js.errors import NotFoundError

from parley.common.bus import EVENTS_STREAM, call_events
from parley.common.events import CallStreamStarted, decode

from ..calls import find_by_call_id
from ..keys import CALLS

if TYPE_CHECKING:
    from .session import TwilioSession

log = logging.getLogger(__name__)

# A call's statuses at Twilio once it is over (not "queued", "ringing" or "in-progress").
ENDED_AT_TWILIO = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})


async def end_unless_next_stream(session: TwilioSession, play_s: float) -> None:
    """Wait ``play_s`` + the reconnect wait for the call's next stream; else end the call."""
    call, rest, stream_id = session.call, session.rest, session.stream_id
    assert call is not None and rest is not None
    wait = play_s + session.config.gateway_carrier_reconnect_wait_s
    stopping = session.app[CALLS].stopping
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), wait)
    async with session.pool.connection() as conn:
        now = await find_by_call_id(conn, call.call_id)
    if now is None or now.ended:
        return
    if await _last_stream_id(session) != stream_id:
        log.info("call %s: back on a new stream after the redirect", call.call_id)
        return
    try:
        at_twilio = await rest.fetch(call.carrier_call_id)
        status, duration = at_twilio.status, at_twilio.duration
    except Exception:
        log.exception("call %s: could not ask Twilio for the call's status", call.call_id)
        status = duration = None
    if status in ENDED_AT_TWILIO:
        log.info("call %s: the caller hung up during the redirect (Twilio: %s)", call.call_id,
                 status)
        await session.end_call("caller_hangup",
                               duration_s=None if duration is None else float(duration))
        return
    if stopping.is_set() and status == "in-progress":
        log.warning("call %s: the gateway is stopping before the call's next stream started; "
                    "Twilio has it in progress, so it is left to that stream", call.call_id)
        return
    log.warning("call %s: no new stream within %gs of the redirect, and Twilio has the call "
                "%s; hanging up", call.call_id, wait, status or "in an unknown state")
    try:
        await session.hangup("error")
    except Exception:
        log.exception("call %s: hang-up after the redirect failed", call.call_id)


async def _last_stream_id(session: TwilioSession) -> str:
    """The stream of the call's latest call.stream_started, whichever instance published it."""
    call = session.call
    assert call is not None
    subject = call_events(call.call_id, call.org_id, "call.stream_started")
    try:
        message = await session.bus.js.get_last_msg(EVENTS_STREAM, subject)
    except NotFoundError:
        return ""
    event = decode(message.data or b"")
    return event.stream_id if isinstance(event, CallStreamStarted) else ""
