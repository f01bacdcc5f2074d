"""The Plivo audio-stream protocol's messages, as msgspec Structs decoded by one Decoder.

In (Plivo → us): ``start``, ``media``, ``dtmf``, ``playedStream`` (echo of our checkpoint),
``clearedAudio``; any other event is ignored (counted, :mod:`parley.gateway.carrier_messages`).
Out (us → Plivo): ``playAudio``, ``checkpoint``, ``clearAudio``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from parley.common.bus.audio import CARRIER_SEQ_BITS

from ..carrier_messages import CarrierDecoder, UnknownMessage

CONTENT_TYPE = "audio/x-mulaw"
SAMPLE_RATE = 8000


# The carrier's sequence number takes the low CARRIER_SEQ_BITS bits of an audio frame's seq
# (parley.common.bus.audio): a larger one is a protocol violation (4400) at decoding, not a
# struct.error (1011) when the frame is packed.
SequenceNumber = Annotated[int, msgspec.Meta(ge=1, lt=1 << CARRIER_SEQ_BITS)]


class _Message(msgspec.Struct, tag_field="event", rename="camel", kw_only=True):
    sequence_number: SequenceNumber | None = None
    stream_id: str = ""


class MediaFormat(msgspec.Struct, rename="camel", kw_only=True):
    """``start.mediaFormat``."""

    encoding: str = CONTENT_TYPE
    sample_rate: int = SAMPLE_RATE


class StartDetails(msgspec.Struct, rename="camel", kw_only=True):
    """``start.start``: which call and stream."""

    call_id: str
    stream_id: str
    account_id: str = ""
    tracks: list[str] = msgspec.field(default_factory=list)
    media_format: MediaFormat = msgspec.field(default_factory=MediaFormat)


class Start(_Message, tag="start"):
    """The stream began."""

    start: StartDetails
    extra_headers: str = msgspec.field(default="", name="extra_headers")


class MediaChunk(msgspec.Struct, kw_only=True):
    """One chunk of base64 µ-law; ``timestamp`` is Unix milliseconds (sent as a string)."""

    payload: str
    track: str = "inbound"
    chunk: int = 0
    timestamp: int = 0


class Media(_Message, tag="media"):
    """Caller audio."""

    sequence_number: SequenceNumber
    media: MediaChunk


class Digit(msgspec.Struct, kw_only=True):
    """``dtmf.dtmf``."""

    digit: str
    track: str = "inbound"
    timestamp: int = 0


class Dtmf(_Message, tag="dtmf"):
    """The caller pressed a key."""

    dtmf: Digit


class PlayedStream(_Message, tag="playedStream"):
    """The echo of a checkpoint we sent: the audio queued before it has been played."""

    name: str


class ClearedAudio(_Message, tag="clearedAudio"):
    """Plivo flushed the audio we had queued (our clearAudio)."""


StreamMessage = Start | Media | Dtmf | PlayedStream | ClearedAudio
# strict=False: Plivo sends media.timestamp (and possibly other numbers) as JSON strings.
_decoder: CarrierDecoder[StreamMessage] = CarrierDecoder(StreamMessage, tag_field="event")
_encoder = msgspec.json.Encoder()


def decode_message(data: str) -> StreamMessage | UnknownMessage:
    """Parse one message (an event this protocol does not list: ignored) or raise what is wrong.

    Plivo's own code reads more events off the socket than its protocol page lists (``stop``,
    ``playFailed``, ``error``, ``muteStream``); without their documented meaning they are left
    to the tolerant path, and the call's end comes from Plivo's hangup callback as before.
    """
    return _decoder.decode(data)


def event_name(message: StreamMessage) -> str:
    """The message's ``event`` value."""
    return str(type(message).__struct_config__.tag)


def play_audio(payload_b64: str) -> bytes:
    """``playAudio``: queue base64 µ-law for the caller."""
    return _encoder.encode({"event": "playAudio", "media": {
        "contentType": CONTENT_TYPE, "sampleRate": SAMPLE_RATE, "payload": payload_b64}})


def checkpoint(stream_id: str, name: str) -> bytes:
    """``checkpoint``: ask Plivo to echo ``name`` once the audio queued so far has played."""
    return _encoder.encode({"event": "checkpoint", "streamId": stream_id, "name": name})


def clear_audio(stream_id: str) -> bytes:
    """``clearAudio``: drop the audio queued at Plivo (barge-in)."""
    return _encoder.encode({"event": "clearAudio", "streamId": stream_id})
