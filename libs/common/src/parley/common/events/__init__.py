"""The event catalog: every fact Parley records, one union, one codec.

Names are the contract (see docs/events.md, generated from this package). Decode with
``decode(data)``; it raises :class:`EventDecodeError` naming the offending type or field.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec

from .billing import QuotaExceeded, UsageRecorded
from .brain import (
    AgentReplyPrepared,
    AgentSay,
    IntentDetected,
    KnowledgeRetrieved,
    RequestedCall,
    TokenUsage,
    ToolRequested,
    TurnCompleted,
    TurnStarted,
)
from .call import (
    CallAnswered,
    CallDialing,
    CallDtmf,
    CallEnded,
    CallFailed,
    CallMachineDetected,
    CallRecordingAvailable,
    CallRequested,
    CallRinging,
    CallStreamStarted,
    CallTransferred,
)
from .config import (
    AgentCreated,
    AgentDeleted,
    AgentUpdated,
    ApiKeyCreated,
    ApiKeyRevoked,
    KnowledgeIngested,
    NumberAssigned,
    OrgCreated,
    SecuritySignatureRejected,
)
from .envelope import (
    DECODING,
    MISSING_AT,
    MISSING_ID,
    AgentEvent,
    CallEvent,
    Event,
    OrgEvent,
    is_token,
    utcnow,
    uuid7,
)
from .media import (
    AgentSpeechFinished,
    AgentSpeechInterrupted,
    AgentSpeechProgress,
    AgentSpeechStarted,
    CallerIdle,
    MediaProviderSwitched,
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    TranscriptPartial,
    TurnUserEnded,
    Word,
)
from .postcall import (
    CallerProfileUpdated,
    CallSummarized,
    RecordingAttached,
    WebhookDelivered,
    WebhookFailed,
)
from .tools import ToolApprovalRequested, ToolApproved, ToolCompleted, ToolDenied, ToolFailed

AnyEvent = (
    CallRequested | CallDialing | CallRinging | CallAnswered | CallMachineDetected
    | CallStreamStarted | CallDtmf | CallTransferred | CallEnded | CallFailed
    | CallRecordingAvailable
    | SpeechStarted | SpeechStopped | TranscriptPartial | TranscriptFinal | TurnUserEnded
    | AgentSpeechStarted | AgentSpeechProgress | AgentSpeechInterrupted | AgentSpeechFinished
    | MediaProviderSwitched | CallerIdle
    | TurnStarted | AgentSay | AgentReplyPrepared | TurnCompleted | ToolRequested | IntentDetected
    | KnowledgeRetrieved
    | ToolApprovalRequested | ToolApproved | ToolDenied | ToolCompleted | ToolFailed
    | CallSummarized | RecordingAttached | WebhookDelivered | WebhookFailed | CallerProfileUpdated
    | UsageRecorded | QuotaExceeded
    | OrgCreated | AgentCreated | AgentUpdated | AgentDeleted | ApiKeyCreated | ApiKeyRevoked
    | NumberAssigned
    | KnowledgeIngested | SecuritySignatureRejected
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls
    for cls in typing.get_args(AnyEvent)
}


class EventDecodeError(ValueError):
    """Bytes that are not a valid event; the message names the type or field at fault."""


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    """Serialise an event to JSON bytes (the wire and storage format)."""
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """Parse JSON bytes into the typed event; unknown fields are ignored.

    ``id`` and ``at`` are required (``at`` with its offset): the same bytes always decode to
    the same event.
    """
    DECODING.active = True
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(_explain(data, exc)) from exc
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not an event: {exc}") from exc
    finally:
        DECODING.active = False
    if event.id is MISSING_ID or event.at is MISSING_AT:
        missing = "id" if event.id is MISSING_ID else "at"
        raise EventDecodeError(f"invalid {event.type} event: Object missing required field "
                               f"`{missing}`")
    return event


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as plain JSON-compatible Python values (for jsonb columns and APIs)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result


def _explain(data: bytes | str, exc: msgspec.ValidationError) -> str:
    message = str(exc)
    if "`$.type`" not in message:
        try:
            tag = msgspec.json.decode(data).get("type", "?")
        except (msgspec.DecodeError, AttributeError):
            tag = "?"
        return f"invalid {tag} event: {message}"
    return f"unknown event type: {message}"


__all__ = [
    "EVENT_TYPES", "AgentCreated", "AgentDeleted", "AgentEvent", "AgentReplyPrepared", "AgentSay",
    "AgentSpeechFinished",
    "AgentSpeechInterrupted", "AgentSpeechProgress", "AgentSpeechStarted", "AgentUpdated",
    "AnyEvent", "ApiKeyCreated", "ApiKeyRevoked", "CallAnswered", "CallDialing", "CallDtmf",
    "CallEnded", "CallEvent", "CallFailed", "CallMachineDetected", "CallRecordingAvailable",
    "CallRequested", "CallRinging", "CallStreamStarted", "CallSummarized", "CallTransferred",
    "CallerIdle", "CallerProfileUpdated", "Event", "EventDecodeError", "IntentDetected",
    "KnowledgeIngested",
    "KnowledgeRetrieved", "MediaProviderSwitched", "NumberAssigned", "OrgCreated", "OrgEvent",
    "QuotaExceeded", "RecordingAttached", "RequestedCall", "SecuritySignatureRejected",
    "SpeechStarted", "SpeechStopped", "TokenUsage", "ToolApprovalRequested", "ToolApproved",
    "ToolCompleted", "ToolDenied", "ToolFailed", "ToolRequested", "TranscriptFinal",
    "TranscriptPartial", "TurnCompleted", "TurnStarted", "TurnUserEnded", "UsageRecorded",
    "WebhookDelivered", "WebhookFailed", "Word", "decode", "encode", "is_token", "to_builtins",
    "utcnow", "uuid7",
]
