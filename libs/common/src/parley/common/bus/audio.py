"""Raw audio frames over core NATS: bytes on the wire, sequence and timestamp in headers.

No JSON and no base64 on the hot path. The AUDIO stream captures these subjects for replay
and failover catch-up; live consumers use plain core subscriptions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .subjects import audio_subject

SEQ = "Parley-Seq"
TIMESTAMP = "Parley-Ts"  # milliseconds of audio since the stream started
MARK = "Parley-Mark"  # on outbound frames: a mark to place after this frame

FrameHandler = Callable[[bytes, int, int, Msg], Awaitable[None]]


async def publish_frame(nc: NATS, call_id: str, direction: str, payload: bytes, *, seq: int,
                        timestamp_ms: int, mark: str | None = None) -> None:
    """Publish one frame of raw audio (e.g. 160 bytes of 8 kHz µ-law = 20 ms)."""
    headers = {SEQ: str(seq), TIMESTAMP: str(timestamp_ms)}
    if mark is not None:
        headers[MARK] = mark
    await nc.publish(audio_subject(call_id, direction), payload, headers=headers)


async def subscribe_frames(nc: NATS, call_id: str, direction: str,
                           handler: FrameHandler) -> Subscription:
    """Deliver ``(payload, seq, timestamp_ms, msg)`` for each frame of a call's direction."""

    async def on_message(msg: Msg) -> None:
        headers = msg.headers or {}
        await handler(msg.data, int(headers.get(SEQ, "0")), int(headers.get(TIMESTAMP, "0")), msg)

    return await nc.subscribe(audio_subject(call_id, direction), cb=on_message)
