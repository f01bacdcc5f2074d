"""Twilio Media Streams messages and X-Twilio-Signature, exactly as Twilio produces them.

Twilio → server: ``connected``, ``start``, ``media``, ``mark`` (echo), ``dtmf``, ``stop``;
server → Twilio: ``media``, ``mark``, ``clear``. Field names, nesting and key order follow the
messages Twilio sends, including its quirks: ``sequenceNumber``, ``chunk`` and ``timestamp`` are
JSON strings, and a DTMF track is ``inbound_track``. Signatures are computed by the twilio SDK's
``RequestValidator``, the source of truth.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping

import msgspec

FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law
FRAME_SECONDS = 0.02
SIGNATURE_HEADER = "X-Twilio-Signature"


class ProtocolError(ValueError):
    """A Media Streams message that does not parse."""


def new_sid(prefix: str) -> str:
    """A Twilio-style SID: a two-letter prefix and 32 hex digits (``CA…``, ``MZ…``, ``RE…``)."""
    return prefix + secrets.token_hex(16)


class MediaFormat(msgspec.Struct, frozen=True, rename="camel"):
    """The audio format Twilio announces in ``start``."""

    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000
    channels: int = 1


class StartDetails(msgspec.Struct, frozen=True, rename="camel"):
    """``start.start``: the stream's metadata."""

    account_sid: str
    stream_sid: str
    call_sid: str
    tracks: list[str]
    custom_parameters: dict[str, str]
    media_format: MediaFormat


class MediaChunk(msgspec.Struct, frozen=True):
    """``media.media`` from Twilio: one chunk of base64 µ-law."""

    track: str
    chunk: str
    timestamp: str
    payload: str


class MarkName(msgspec.Struct, frozen=True):
    """``mark.mark``."""

    name: str


class DtmfDigit(msgspec.Struct, frozen=True):
    """``dtmf.dtmf``."""

    track: str
    digit: str


class StopDetails(msgspec.Struct, frozen=True, rename="camel"):
    """``stop.stop``."""

    account_sid: str
    call_sid: str


class _TwilioMessage(msgspec.Struct, frozen=True, tag_field="event", rename="camel"):
    pass


class Connected(_TwilioMessage, tag="connected", frozen=True):
    """First message on a new socket."""

    protocol: str = "Call"
    version: str = "1.0.0"


class Start(_TwilioMessage, tag="start", frozen=True):
    """The stream's metadata, once, right after ``connected``."""

    sequence_number: str
    start: StartDetails
    stream_sid: str


class Media(_TwilioMessage, tag="media", frozen=True):
    """20 ms of caller audio."""

    sequence_number: str
    media: MediaChunk
    stream_sid: str

    def audio(self) -> bytes:
        """The decoded µ-law payload."""
        return base64.b64decode(self.media.payload, validate=True)


class Mark(_TwilioMessage, tag="mark", frozen=True):
    """A mark echoed back: the audio sent before it has finished playing (or was cleared)."""

    sequence_number: str
    stream_sid: str
    mark: MarkName


class Dtmf(_TwilioMessage, tag="dtmf", frozen=True):
    """A key the caller pressed."""

    stream_sid: str
    sequence_number: str
    dtmf: DtmfDigit


class Stop(_TwilioMessage, tag="stop", frozen=True):
    """The stream ended (hang-up, or the call left ``<Connect>``)."""

    sequence_number: str
    stream_sid: str
    stop: StopDetails


TwilioMessage = Connected | Start | Media | Mark | Dtmf | Stop


class OutboundPayload(msgspec.Struct, frozen=True):
    """``media.media`` sent to Twilio: only the payload."""

    payload: str


class _ServerMessage(msgspec.Struct, frozen=True, tag_field="event", rename="camel"):
    pass


class ServerMedia(_ServerMessage, tag="media", frozen=True):
    """Audio for Twilio to play to the caller."""

    stream_sid: str
    media: OutboundPayload

    def audio(self) -> bytes:
        """The decoded µ-law payload."""
        return base64.b64decode(self.media.payload, validate=True)


class ServerMark(_ServerMessage, tag="mark", frozen=True):
    """Ask Twilio to echo ``name`` once the audio sent before it has played."""

    stream_sid: str
    mark: MarkName


class Clear(_ServerMessage, tag="clear", frozen=True):
    """Drop the queued audio; Twilio echoes every pending mark."""

    stream_sid: str


ServerMessage = ServerMedia | ServerMark | Clear

_encoder = msgspec.json.Encoder()
_twilio_decoder = msgspec.json.Decoder(TwilioMessage)
_server_decoder = msgspec.json.Decoder(ServerMessage)


def encode(message: TwilioMessage | ServerMessage) -> str:
    """The JSON text of a message, keys in Twilio's order."""
    return _encoder.encode(message).decode()


def parse_twilio_message(text: str | bytes) -> TwilioMessage:
    """Parse a message Twilio sends; :class:`ProtocolError` says what is wrong."""
    try:
        message: TwilioMessage = _twilio_decoder.decode(text)
    except msgspec.DecodeError as error:
        raise ProtocolError(str(error)) from error
    return message


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse a message a server sends to Twilio; :class:`ProtocolError` says what is wrong."""
    try:
        message: ServerMessage = _server_decoder.decode(text)
        if isinstance(message, ServerMedia):
            message.audio()
    except (msgspec.DecodeError, ValueError) as error:
        raise ProtocolError(str(error)) from error
    return message


def server_media(stream_sid: str, audio: bytes) -> ServerMedia:
    """A server → Twilio ``media`` message."""
    return ServerMedia(stream_sid=stream_sid,
                       media=OutboundPayload(payload=base64.b64encode(audio).decode()))


def server_mark(stream_sid: str, name: str) -> ServerMark:
    """A server → Twilio ``mark`` message."""
    return ServerMark(stream_sid=stream_sid, mark=MarkName(name=name))


def clear(stream_sid: str) -> Clear:
    """A server → Twilio ``clear`` message."""
    return Clear(stream_sid=stream_sid)


class StreamMessages:
    """Builds the messages Twilio sends on one stream, numbering them as Twilio does.

    ``start`` is sequence 1 and every later message takes the next number; ``media`` chunks count
    from 1 and carry the milliseconds since the stream started.
    """

    def __init__(self, *, stream_sid: str, account_sid: str, call_sid: str) -> None:
        self.stream_sid, self.account_sid, self.call_sid = stream_sid, account_sid, call_sid
        self._sequence = 0
        self._chunk = 0
        sid = _encoder.encode(stream_sid)
        self._media_tail = b'"},"streamSid":' + sid + b"}"
        self._media_heads: dict[str, bytes] = {}

    @property
    def sequence(self) -> int:
        """The sequence number of the last message built (0: none yet)."""
        return self._sequence

    def _next(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def connected(self) -> Connected:
        """``{"event":"connected","protocol":"Call","version":"1.0.0"}``."""
        return Connected()

    def start(self, custom_parameters: Mapping[str, str] | None = None,
              tracks: tuple[str, ...] = ("inbound",)) -> Start:
        """The ``start`` message, with the TwiML ``<Parameter>``s as ``customParameters``."""
        details = StartDetails(account_sid=self.account_sid, stream_sid=self.stream_sid,
                               call_sid=self.call_sid, tracks=list(tracks),
                               custom_parameters=dict(custom_parameters or {}),
                               media_format=MediaFormat())
        return Start(sequence_number=self._next(), start=details, stream_sid=self.stream_sid)

    def media(self, audio: bytes, timestamp_ms: int, track: str = "inbound") -> Media:
        """One chunk of caller audio captured ``timestamp_ms`` after the stream started."""
        self._chunk += 1
        chunk = MediaChunk(track=track, chunk=str(self._chunk), timestamp=str(timestamp_ms),
                           payload=base64.b64encode(audio).decode())
        return Media(sequence_number=self._next(), media=chunk, stream_sid=self.stream_sid)

    def media_text(self, payload: bytes, timestamp_ms: int, track: str = "inbound") -> bytes:
        """``encode(self.media(audio, timestamp_ms, track))`` as UTF-8.

        ``payload`` is ``base64.b64encode(audio)``. The same text and numbering, without building
        the structs (a simulated caller sends 50 a second, and can encode its audio once).
        """
        self._chunk += 1
        self._sequence += 1
        head = self._media_heads.get(track)
        if head is None:
            head = self._media_heads[track] = b',"media":{"track":' + _encoder.encode(track)
        return b'{"event":"media","sequenceNumber":"%d"%s,"chunk":"%d","timestamp":"%d",' \
            b'"payload":"%s%s' % (self._sequence, head, self._chunk, timestamp_ms, payload,
                                  self._media_tail)

    def mark(self, name: str) -> Mark:
        """The echo of a server's mark."""
        return Mark(sequence_number=self._next(), stream_sid=self.stream_sid,
                    mark=MarkName(name=name))

    def dtmf(self, digit: str) -> Dtmf:
        """A key press on the caller's side."""
        return Dtmf(stream_sid=self.stream_sid, sequence_number=self._next(),
                    dtmf=DtmfDigit(track="inbound_track", digit=digit))

    def stop(self) -> Stop:
        """The last message of the stream."""
        return Stop(sequence_number=self._next(), stream_sid=self.stream_sid,
                    stop=StopDetails(account_sid=self.account_sid, call_sid=self.call_sid))


def compute_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """X-Twilio-Signature for a request to ``url`` with form ``params``, as Twilio computes it.

    HMAC-SHA1 keyed by the auth token over the URL followed by every POST parameter's name and
    value, sorted by name, base64-encoded. Computed by the twilio SDK's ``RequestValidator``.
    """
    from twilio.request_validator import RequestValidator

    return str(RequestValidator(auth_token).compute_signature(url, dict(params or {})))


def websocket_signature(auth_token: str, url: str) -> str:
    """X-Twilio-Signature on a WebSocket upgrade: the ``wss://`` URL with no parameters."""
    return compute_signature(auth_token, url, {})
