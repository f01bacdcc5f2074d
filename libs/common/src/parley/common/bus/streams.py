"""Idempotent creation of the JetStream streams and KV bucket Parley runs on."""

from __future__ import annotations

from dataclasses import replace

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from .subjects import AUDIO_PREFIX, DEAD_LETTER_PREFIX, EVENTS_PREFIX

EVENTS_STREAM = "EVENTS"
AUDIO_STREAM = "AUDIO"
DEAD_LETTER_STREAM = "DEADLETTER"
LEASES_BUCKET = "call_leases"


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Replicas and retention; R1 for a dev node, R3 on a cluster."""

    replicas: int = 1
    events_max_age_s: float = 7 * 24 * 3600.0
    audio_max_age_s: float = 30 * 60.0
    audio_storage: str = "file"
    dead_letter_max_age_s: float = 30 * 24 * 3600.0
    # How long a call's lease outlives its last renewal. Longer than any outage of every media
    # instance (a call's longest: Twilio's 4 h): a lease that expired while none was alive was
    # taken up by none that started later, and its call stayed silent. Leases of calls that
    # ended meanwhile are let go by the instance that takes them over.
    lease_ttl_s: float = 4 * 3600.0
    duplicate_window_s: float = 120.0


def stream_configs(settings: StreamSettings) -> list[StreamConfig]:
    """The desired configuration of every stream."""
    return [
        StreamConfig(
            name=EVENTS_STREAM, subjects=[f"{EVENTS_PREFIX}.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS, max_age=settings.events_max_age_s,
            num_replicas=settings.replicas, duplicate_window=settings.duplicate_window_s,
            discard=DiscardPolicy.OLD, allow_direct=True,
            description="Every domain event; Postgres keeps them for good",
        ),
        StreamConfig(
            name=AUDIO_STREAM, subjects=[f"{AUDIO_PREFIX}.>"],
            storage=StorageType(settings.audio_storage), retention=RetentionPolicy.LIMITS,
            max_age=settings.audio_max_age_s, num_replicas=settings.replicas,
            discard=DiscardPolicy.OLD,
            description="Raw call audio for replay and failover catch-up",
        ),
        StreamConfig(
            name=DEAD_LETTER_STREAM, subjects=[f"{DEAD_LETTER_PREFIX}.>"],
            storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
            max_age=settings.dead_letter_max_age_s, num_replicas=settings.replicas,
            description="Messages a consumer gave up on, with the reason in headers",
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create the streams and the lease bucket, or update them to match the settings."""
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except BadRequestError:  # created concurrently by another instance
                pass
        await js.update_stream(config)
    try:
        await js.create_key_value(KeyValueConfig(
            bucket=LEASES_BUCKET, ttl=settings.lease_ttl_s, history=1,
            replicas=settings.replicas, description="Which media instance owns which call",
        ))
    except BadRequestError:  # made with another configuration (an older TTL): update it
        bucket = (await js.stream_info(f"KV_{LEASES_BUCKET}")).config
        await js.update_stream(replace(
            bucket, max_age=settings.lease_ttl_s, num_replicas=settings.replicas,
            duplicate_window=min(bucket.duplicate_window or 120.0, settings.lease_ttl_s,
                                 120.0)))
