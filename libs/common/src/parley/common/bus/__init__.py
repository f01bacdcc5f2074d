"""The message bus: JetStream for events, core NATS for live reactions and audio."""

from .audio import publish_frame, subscribe_frames
from .client import Bus, connect
from .consumer import ConsumerSettings, DurableConsumer, PermanentError, dead_letter
from .outbox import Outbox
from .streams import (
    AUDIO_STREAM,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    LEASES_BUCKET,
    StreamSettings,
    ensure_streams,
)
from .subjects import (
    audio_subject,
    call_events,
    command_subject,
    dead_letter_subject,
    event_subject,
    events_of_type,
    org_events,
    parse_event_subject,
)

__all__ = [
    "AUDIO_STREAM", "DEAD_LETTER_STREAM", "EVENTS_STREAM", "LEASES_BUCKET", "Bus", "Outbox",
    "ConsumerSettings", "DurableConsumer", "PermanentError", "StreamSettings", "audio_subject",
    "call_events", "command_subject", "connect", "dead_letter", "dead_letter_subject",
    "ensure_streams", "event_subject", "events_of_type", "org_events", "parse_event_subject",
    "publish_frame", "subscribe_frames",
]
