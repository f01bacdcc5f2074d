"""After-the-call events, emitted by postcall."""

from __future__ import annotations

from typing import Literal

import msgspec

from .envelope import CallEvent


class CallSummarized(CallEvent, frozen=True, kw_only=True, tag="call.summarized"):
    """Summary, sentiment and outcome of a finished call."""

    summary: str
    sentiment: Literal["positive", "neutral", "negative"] = "neutral"
    outcome: str = ""


class RecordingAttached(CallEvent, frozen=True, kw_only=True, tag="recording.attached"):
    """The call's recording is stored and can be fetched."""

    url: str
    duration_s: float = 0.0
    content_type: str = "audio/wav"


class WebhookDelivered(CallEvent, frozen=True, kw_only=True, tag="webhook.delivered"):
    """A webhook delivery succeeded."""

    delivery_id: str
    endpoint_id: str
    event_id: str
    status: int
    attempts: int = 1


class WebhookFailed(CallEvent, frozen=True, kw_only=True, tag="webhook.failed"):
    """A webhook delivery was dead-lettered after its last attempt."""

    delivery_id: str
    endpoint_id: str
    event_id: str
    error: str
    attempts: int = 1


class CallerProfileUpdated(CallEvent, frozen=True, kw_only=True, tag="caller.profile_updated"):
    """What Parley remembers about a caller changed after a call."""

    caller_number: str
    facts: dict[str, str] = msgspec.field(default_factory=dict)
