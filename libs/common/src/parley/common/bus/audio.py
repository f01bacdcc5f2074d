"""Raw audio frames over core NATS: a 21-byte binary prefix, then the audio bytes.

No JSON, no base64 and no NATS headers on the hot path: parsing ``Parley-Seq``/``Parley-Ts``
headers was about half of nats-py's per-message cost at a media instance (50 frames/s per
call), so sequence and timestamps travel in a fixed prefix that one ``struct`` call reads:

    version (u8 = 2) | seq (u64) | audio ms since the stream started (u32) | sent (u64, epoch ns)

An inbound ``seq`` grows over all of a call's carrier streams, not only within one: a call
gets a new stream on a reconnect (sending DTMF, a gateway failover through ``<Connect
action>``), and the carrier numbers each stream from 1 again. The gateway sends
:func:`stream_seq_base` of the stream's start (its wall clock, in ms since 2024) plus the
carrier's sequence number, which takes the low :data:`CARRIER_SEQ_BITS` bits (23 hours of
20 ms frames); :func:`carrier_sequence` gives the carrier's number back. So a consumer drops
duplicates, and resumes after a checkpoint, by ``seq`` alone, whichever gateway instance sent
the frame — as long as the gateways' clocks differ by less than the gap between one stream's
end and the next one's start (seconds: the carrier reconnects after a redirect or a failure).
The audio ms restart at 0 with each stream. Version 1 frames (``seq`` u32, numbered per
stream) from a gateway not yet upgraded are still read.

``sent`` is when the publisher put the frame on the bus (its wall clock), so a consumer can tell
how late it handles a frame — live or replayed from the AUDIO stream — without JetStream
metadata. The only header left is ``Parley-Mark`` on an outbound frame that carries a mark.

A frame is as long as its sender makes it: inbound frames are what the telephony side sends
(20 ms from Twilio); media sends agent audio that is ready together as one frame of up to
200 ms (``seq`` and the audio ms then count 20 ms units, so they step by the frames it holds).

The AUDIO stream captures these subjects for replay and failover catch-up; live consumers use
plain core subscriptions.
"""

from __future__ import annotations

import datetime
import logging
import struct
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .subjects import audio_subject

log = logging.getLogger(__name__)

MARK = "Parley-Mark"  # on outbound frames: a mark to place after this frame
FORMAT_VERSION = 2
PREFIX = struct.Struct("<BQIQ")
PREFIX_BYTES = PREFIX.size
_PREFIX_V1 = struct.Struct("<BIIQ")
CARRIER_SEQ_BITS = 22
_SEQ_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00Z: a seq stays below 2**63 until 2093

FrameHandler = Callable[[bytes, int, int, Msg], Awaitable[None]]


class FrameFormatError(ValueError):
    """A message on an audio subject that is not a frame of this format."""


def stream_seq_base(started: datetime.datetime) -> int:
    """What a stream that started at ``started`` adds to the carrier's sequence numbers."""
    started_ms = round(started.timestamp() * 1000) - _SEQ_EPOCH_MS
    return max(0, started_ms) << CARRIER_SEQ_BITS


def carrier_sequence(seq: int) -> int:
    """The carrier's own sequence number in an inbound frame's ``seq``."""
    return seq & ((1 << CARRIER_SEQ_BITS) - 1)


def encode_frame(payload: bytes, *, seq: int, timestamp_ms: int,
                 sent_ns: int | None = None) -> bytes:
    """The wire form of one frame (``sent_ns`` defaults to now)."""
    return PREFIX.pack(FORMAT_VERSION, seq, timestamp_ms,
                       time.time_ns() if sent_ns is None else sent_ns) + payload


def decode_frame(data: bytes) -> tuple[int, int, int, bytes]:
    """``(seq, timestamp_ms, sent_ns, payload)`` of a frame's wire form."""
    if len(data) >= PREFIX_BYTES and data[0] == FORMAT_VERSION:
        _, seq, timestamp_ms, sent_ns = PREFIX.unpack_from(data)
        return seq, timestamp_ms, sent_ns, data[PREFIX_BYTES:]
    if len(data) >= _PREFIX_V1.size and data[0] == 1:
        _, seq, timestamp_ms, sent_ns = _PREFIX_V1.unpack_from(data)
        return seq, timestamp_ms, sent_ns, data[_PREFIX_V1.size:]
    raise FrameFormatError(f"not an audio frame (v{FORMAT_VERSION}): {bytes(data[:8])!r}")


async def publish_frame(nc: NATS, call_id: str, direction: str, payload: bytes, *, seq: int,
                        timestamp_ms: int, mark: str | None = None) -> None:
    """Publish one frame of raw audio (e.g. 160 bytes of 8 kHz µ-law = 20 ms)."""
    data = encode_frame(payload, seq=seq, timestamp_ms=timestamp_ms)
    await nc.publish(audio_subject(call_id, direction), data,
                     headers={MARK: mark} if mark is not None else None)


async def subscribe_frames(nc: NATS, call_id: str, direction: str,
                           handler: FrameHandler) -> Subscription:
    """Deliver ``(payload, seq, timestamp_ms, msg)`` for each frame of a call's direction.

    A message that is not a frame is logged and skipped (there is nobody to answer).
    """

    async def on_message(msg: Msg) -> None:
        try:
            seq, timestamp_ms, _, payload = decode_frame(msg.data)
        except FrameFormatError as exc:
            log.warning("%s: %s; skipped", msg.subject, exc)
            return
        await handler(payload, seq, timestamp_ms, msg)

    return await nc.subscribe(audio_subject(call_id, direction), cb=on_message)
