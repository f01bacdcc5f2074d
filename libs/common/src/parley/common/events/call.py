"""Telephony events, emitted by the gateway."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .envelope import CallEvent

Direction = Literal["inbound", "outbound"]
Carrier = Literal["twilio", "plivo", "simulator"]


class CallRequested(CallEvent, frozen=True, kw_only=True, tag="call.requested"):
    """A call was asked for: an inbound webhook arrived or the API placed an outbound call."""

    direction: Direction
    agent_id: str
    from_number: str
    to_number: str
    carrier: Carrier = "twilio"
    carrier_call_id: str = ""
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class CallDialing(CallEvent, frozen=True, kw_only=True, tag="call.dialing"):
    """The carrier accepted an outbound call and is dialing."""

    carrier_call_id: str


class CallRinging(CallEvent, frozen=True, kw_only=True, tag="call.ringing"):
    """The far end is ringing."""


class CallAnswered(CallEvent, frozen=True, kw_only=True, tag="call.answered"):
    """The call was answered (by a person or a machine; see call.machine_detected)."""


class CallMachineDetected(CallEvent, frozen=True, kw_only=True, tag="call.machine_detected"):
    """Answering-machine detection result."""

    answered_by: Literal["human", "machine_start", "machine_end_beep", "machine_end_silence",
                         "machine_end_other", "fax", "unknown"]
    action: Literal["continue", "hangup", "leave_message"] = "continue"


class CallStreamStarted(CallEvent, frozen=True, kw_only=True, tag="call.stream_started"):
    """A media stream is live; the instance holding its socket owns the call's telephony I/O."""

    stream_id: str
    gateway_instance: str
    encoding: Literal["mulaw", "l16"] = "mulaw"
    sample_rate: int = 8000
    pipeline: Literal["cascading", "managed", "realtime"] = "cascading"
    agent_id: str = ""


class CallDtmf(CallEvent, frozen=True, kw_only=True, tag="call.dtmf"):
    """The caller pressed a key."""

    digit: str


class CallTransferred(CallEvent, frozen=True, kw_only=True, tag="call.transferred"):
    """The call was handed to another number."""

    to_number: str
    mode: Literal["cold", "warm"] = "cold"


class CallEnded(CallEvent, frozen=True, kw_only=True, tag="call.ended"):
    """The call is over."""

    # idle: the agent hung up on a caller silent for the agent's idle_hangup_s (caller.idle)
    reason: Literal["caller_hangup", "agent_hangup", "completed", "max_duration", "transferred",
                    "machine", "no_answer", "busy", "error", "idle"] = "completed"
    duration_s: float = 0.0


class CallFailed(CallEvent, frozen=True, kw_only=True, tag="call.failed"):
    """The call could not be placed or broke before it was answered."""

    reason: str
    carrier_status: str = ""


class CallRecordingAvailable(CallEvent, frozen=True, kw_only=True,
                             tag="call.recording_available"):
    """The carrier finished a recording; postcall fetches ``url`` and attaches it."""

    recording_sid: str
    url: str
    duration_s: float = 0.0
    carrier: Carrier = "twilio"
