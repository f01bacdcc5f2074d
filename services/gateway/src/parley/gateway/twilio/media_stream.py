"""``WSS /twilio/stream``: Twilio Media Streams, bridged to the bus.

In (Twilio → us): ``connected``, ``start``, ``media``, ``mark`` (echo), ``dtmf``, ``stop``;
a message of any other event is ignored (counted, :mod:`parley.gateway.carrier_messages`).
Inbound µ-law goes to ``parley.audio.<call>.in`` as raw bytes after a binary prefix with
Twilio's sequence number (on top of the stream's start, so it grows over all of the call's
streams) and timestamp (:mod:`parley.common.bus.audio`); mark echoes become
agent.speech.progress; dtmf becomes call.dtmf; stop ends the call unless it already ended.

Out (us → Twilio): frames from ``parley.audio.<call>.out`` become ``media`` messages, and a
frame carrying a ``Parley-Mark`` header is followed by a ``mark``; commands (``clear``,
``mark``, ``hangup``, ``dtmf``, ``transfer``) arrive on ``parley.cmd.gateway.<call>.*``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from typing import Annotated, ClassVar

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.errors import OutboundBufferLimitError

from parley.common.bus import audio_subject, subscribe_frames
from parley.common.bus.audio import CARRIER_SEQ_BITS, MARK, encode_frame, stream_seq_base
from parley.common.events import AgentSpeechProgress, CallDtmf, is_token

from ..carrier_messages import CarrierDecoder, UnknownMessage
from ..close_codes import CloseCode, ProtocolViolation, clean_text
from ..commands import CommandError
from ..keys import CONFIG
from ..marks import parse_mark
from ..replays import issue_next_connect, withdraw_connect
from . import twiml
from .session import TwilioSession, carrier_socket
from .signatures import verify_twilio

log = logging.getLogger(__name__)


# What fits the frame prefix (parley.common.bus.audio): the carrier's sequence number takes the
# low CARRIER_SEQ_BITS bits of a frame's seq, the stream's audio ms a u32. Anything else is a
# protocol violation (4400) at decoding, not a struct.error (1011) when the frame is packed.
SequenceNumber = Annotated[int, msgspec.Meta(ge=1, lt=1 << CARRIER_SEQ_BITS)]
AudioMs = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]


class _Message(msgspec.Struct, tag_field="event", rename="camel", kw_only=True):
    sequence_number: SequenceNumber | None = None
    stream_sid: str = ""


class Connected(_Message, tag="connected"):
    """First message: the protocol announcement."""

    protocol: str = ""
    version: str = ""


class StartDetails(msgspec.Struct, rename="camel", kw_only=True):
    """``start.start``: which call and stream, and our custom parameters."""

    stream_sid: str
    call_sid: str
    account_sid: str = ""
    tracks: list[str] = msgspec.field(default_factory=list)
    custom_parameters: dict[str, str] = msgspec.field(default_factory=dict)


class Start(_Message, tag="start"):
    """The stream began."""

    start: StartDetails


class MediaChunk(msgspec.Struct, kw_only=True):
    """One chunk of base64 µ-law (Twilio sends chunk and timestamp as strings)."""

    payload: str
    track: str = "inbound"
    chunk: int = 0
    timestamp: AudioMs = 0


class Media(_Message, tag="media"):
    """Caller audio."""

    sequence_number: SequenceNumber
    media: MediaChunk


class MarkName(msgspec.Struct):
    """``mark.mark``."""

    name: str


class Mark(_Message, tag="mark"):
    """The echo of a mark we sent: the audio before it has been played."""

    mark: MarkName


class Digit(msgspec.Struct):
    """``dtmf.dtmf``."""

    digit: str
    track: str = "inbound_track"


class Dtmf(_Message, tag="dtmf"):
    """The caller pressed a key."""

    dtmf: Digit


class Stop(_Message, tag="stop"):
    """The stream ended (the call hung up, or the stream was stopped)."""


StreamMessage = Connected | Start | Media | Mark | Dtmf | Stop
# strict=False: Twilio sends sequenceNumber, chunk and timestamp as JSON strings.
_decoder: CarrierDecoder[StreamMessage] = CarrierDecoder(StreamMessage, tag_field="event")
_encoder = msgspec.json.Encoder()
_MEDIA_TAIL = b'"}}'  # an outbound media message after its payload


def decode_message(data: str) -> StreamMessage | UnknownMessage:
    """Parse one message (an event Twilio added since: ignored) or raise what is wrong."""
    return _decoder.decode(data)


def add_routes(app: web.Application) -> None:
    """Register ``/twilio/stream``."""
    app.router.add_get(twiml.STREAM_PATH, media_stream)


async def media_stream(request: web.Request) -> web.WebSocketResponse:
    """Check the upgrade's signature, then run the socket as its own session."""
    await verify_twilio(request, websocket=True)
    ws = carrier_socket(request.app[CONFIG])
    await ws.prepare(request)
    await MediaStreamSession(request.app, ws).run()
    return ws


class MediaStreamSession(TwilioSession):
    """One Media Streams socket."""

    protocol: ClassVar[str] = "twilio_stream"
    route: ClassVar[str] = twiml.STREAM_PATH
    streams_audio: ClassVar[bool] = True  # a media message every 20 ms

    def __init__(self, app: web.Application, ws: web.WebSocketResponse) -> None:
        super().__init__(app, ws)
        self.stream_sid = ""
        self.last_sequence = 0
        self.seq_base = 0  # added to Twilio's sequenceNumber: the call's frames keep growing
        self.audio_in = ""  # the call's inbound audio subject, once attached
        self._media_head = b""  # an outbound media message up to its payload (subscribe)
        frames = self.metrics.loop_counter("gateway_frames", "Audio frames relayed",
                                           ["protocol", "direction"])  # counted every frame
        self._frames_in = frames.labels(self.protocol, "in")
        self._frames_out = frames.labels(self.protocol, "out")

    async def on_text(self, data: str) -> None:
        """Dispatch one Media Streams message."""
        message = _decoder.decode(data)
        if type(message) is Media:  # the caller's audio, 50 a second: the same checks, inline
            number = message.sequence_number
            if number <= self.last_sequence:
                raise ProtocolViolation(CloseCode.OUT_OF_ORDER, f"sequenceNumber {number} after "
                                        f"{self.last_sequence}")
            self.last_sequence = number
            if self.call is None:
                raise ProtocolViolation(CloseCode.NOT_STARTED, "media before start")
            if message.stream_sid != self.stream_sid:
                raise ProtocolViolation(CloseCode.POLICY_VIOLATION,
                                        f"unknown stream {message.stream_sid[:40]!r}")
            await self._media(message)
            return
        if isinstance(message, UnknownMessage):
            self.ignore(message)
            return
        if isinstance(message, Connected):
            return
        self._check_order(message)
        if isinstance(message, Start):
            await self._start(message)
            return
        if not self.started:
            raise ProtocolViolation(CloseCode.NOT_STARTED, f"{_event(message)} before start")
        if message.stream_sid != self.stream_sid:
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION,
                                    f"unknown stream {message.stream_sid[:40]!r}")
        match message:
            case Media():
                await self._media(message)
            case Mark():
                name = clean_text(message.mark.name, 256)
                turn_id, seq = parse_mark(name)
                await self.publish(AgentSpeechProgress(
                    org_id=self._org, call_id=self.call_id, turn_id=turn_id, mark=name,
                    seq=seq))
            case Dtmf():
                await self.publish(CallDtmf(org_id=self._org, call_id=self.call_id,
                                            digit=dtmf_digit(message.dtmf.digit)))
            case Stop():
                await self._stop()

    @property
    def _org(self) -> str:
        assert self.call is not None
        return self.call.org_id

    def _check_order(self, message: StreamMessage) -> None:
        number = message.sequence_number
        if number is None:
            return
        if number <= self.last_sequence:
            raise ProtocolViolation(CloseCode.OUT_OF_ORDER, f"sequenceNumber {number} after "
                                    f"{self.last_sequence}")
        self.last_sequence = number

    async def _start(self, message: Start) -> None:
        if self.started:
            raise ProtocolViolation(CloseCode.DUPLICATE_START, "second start on one socket")
        details = message.start
        self.stream_sid = message.stream_sid or details.stream_sid
        if not is_token(self.stream_sid) or details.stream_sid != self.stream_sid:
            raise ProtocolViolation(CloseCode.INVALID_MESSAGE, "start without a consistent, "
                                    "valid streamSid")
        self.seq_base = stream_seq_base(self.clock())
        await self.attach(details.call_sid, details.custom_parameters, self.stream_sid)
        self.audio_in = audio_subject(self.call_id, "in")

    async def _media(self, message: Media) -> None:
        chunk = message.media
        if chunk.track not in ("inbound", "inbound_track"):
            return
        try:
            audio = b64decode(chunk.payload)
        except (binascii.Error, ValueError):
            raise ProtocolViolation(CloseCode.INVALID_PAYLOAD,
                                    f"media {message.sequence_number}: invalid base64") from None
        if audio:  # publish_frame's work, with the subject worked out once per stream
            try:
                await self.bus.nc.publish(self.audio_in, encode_frame(
                    audio, seq=self.seq_base + message.sequence_number,
                    timestamp_ms=chunk.timestamp))
            except OutboundBufferLimitError:
                self.audio_refused()
                return
            self._frames_in.inc()

    async def _stop(self) -> None:
        self.finished = True
        if self.redirecting:  # a transfer ends the call; DTMF brings it back to a new stream
            log.info("call %s: stream %s stopped for a redirect", self.call_id, self.stream_sid)
        elif await self.end_call("caller_hangup"):
            log.info("call %s ended by the caller (stream stop)", self.call_id)
        await self.close(CloseCode.NORMAL, "stream stopped")

    # -- outwards ---------------------------------------------------------------------------

    async def subscribe(self) -> None:
        """Relay the agent's audio frames (and marks) to Twilio."""
        self._media_head = _encoder.encode({"event": "media", "streamSid": self.stream_sid,
                                            "media": {"payload": ""}})[:-len(_MEDIA_TAIL)]
        self.add_subscription(await subscribe_frames(self.bus.nc, self.call_id, "out",
                                                     self._out_frame))

    async def _out_frame(self, payload: bytes, seq: int, timestamp_ms: int, msg: Msg) -> None:
        # {"event":"media","streamSid":…,"media":{"payload":…}} as the encoder writes it: base64
        # is ASCII that JSON never escapes, so only the stream's part is encoded (once)
        if not await self.send(b"".join((self._media_head, binascii.b2a_base64(
                payload, newline=False), _MEDIA_TAIL))):
            return
        self._frames_out.inc()
        headers = msg.headers
        if headers and (name := headers.get(MARK)):
            await self.send(self._mark_message(name))

    async def clear(self) -> None:
        """Flush the audio Twilio has queued (barge-in)."""
        await self.send_or_refuse("clear", _encoder.encode({"event": "clear",
                                                            "streamSid": self.stream_sid}))

    async def mark(self, name: str) -> None:
        """Ask Twilio to echo ``name`` once the audio sent so far has played."""
        await self.send_or_refuse("mark", self._mark_message(name))

    def _mark_message(self, name: str) -> bytes:
        return _encoder.encode({"event": "mark", "streamSid": self.stream_sid,
                                "mark": {"name": name}})

    async def send_digits(self, digits: str) -> None:
        """Play DTMF: redirect the call to ``<Play digits>`` and then a new stream.

        If the redirect fails the stream goes on, and its later ``stop`` ends the call. If it
        succeeds, this socket's end waits for the next stream, which a caller who hangs up
        while the digits play never gets (:mod:`.next_stream`).
        """
        call, agent = self.call, self.agent
        if call is None or agent is None:
            raise CommandError("no call attached yet")
        if self.rest is None:
            raise CommandError("sending DTMF needs the Twilio REST client")
        play_s = twiml.digits_play_s(digits)
        async with self.pool.connection() as conn:  # the next stream's own one-time token
            issued = await issue_next_connect(conn, self.app, call.call_id, after_s=play_s)
        try:
            await self.redirect(twiml.digits_then_connect(
                self.config, agent.settings, digits, call_id=call.call_id, org_id=call.org_id,
                agent_id=call.agent_id, issued=issued))
        except BaseException:
            # Still on this stream's connect: left issued, the new one made this connect's
            # action stale, and Twilio asking it when this socket drops was answered <Hangup/>
            with contextlib.suppress(Exception):
                async with self.pool.connection() as conn:
                    await withdraw_connect(conn, call.call_id, issued.number)
            raise
        self.next_stream_after_s = play_s


def b64decode(payload: str) -> bytes:
    """``base64.b64decode(payload, validate=True)``, without its regex for a payload that is fine.

    binascii's strict mode accepts only what ``validate=True`` accepts (the alphabet, then at
    most the padding a whole payload ends with) and decodes it the same; whatever it refuses is
    left to ``b64decode`` to decode or refuse as before. A caller's every frame is decoded here.
    """
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(payload, validate=True)


_DIGITS = frozenset("0123456789*#ABCD")


def dtmf_digit(digit: str) -> str:
    """A DTMF key as Twilio reports it; anything else is a protocol error."""
    if len(digit) != 1 or digit not in _DIGITS:
        raise ProtocolViolation(CloseCode.INVALID_MESSAGE, f"invalid dtmf digit {digit[:8]!r}")
    return digit


def _event(message: StreamMessage) -> str:
    return str(type(message).__struct_config__.tag)
