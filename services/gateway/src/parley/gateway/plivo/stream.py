"""``WSS /plivo/stream``: Plivo's bidirectional audio stream, bridged to the bus.

In: ``start`` attaches the socket to the call named by the ``call_id`` in its (signed) URL and
the ``callId`` Plivo sends; ``media`` µ-law goes to ``parley.audio.<call>.in`` as raw bytes
with Plivo's sequence number (on top of the stream's start, so it grows over all of the
call's streams, see :mod:`parley.common.bus.audio`) and the milliseconds of audio received so
far; ``dtmf`` becomes call.dtmf; ``playedStream`` (the echo of our checkpoint) becomes
agent.speech.progress.

Out: frames from ``parley.audio.<call>.out`` become ``playAudio``, and a frame carrying a
``Parley-Mark`` header is followed by a ``checkpoint``; commands (``clear``, ``mark``,
``hangup``, ``dtmf``, ``transfer``) arrive on ``parley.cmd.gateway.<call>.*``.

The socket lifecycle (start timeout, close codes, ownership, max duration, command serving)
is the carrier-neutral part of :class:`parley.gateway.twilio.session.TwilioSession`, reused
here; what differs — the protocol and call control through Plivo's REST API — is below.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import ClassVar, Literal

from aiohttp import web
from nats.aio.msg import Msg
from nats.errors import OutboundBufferLimitError

from parley.common.bus import publish_frame, subscribe_frames
from parley.common.bus.audio import MARK, stream_seq_base
from parley.common.events import AgentSpeechProgress, CallDtmf, is_token

from ..carrier_messages import UnknownMessage
from ..close_codes import CloseCode, ProtocolViolation, clean_text
from ..commands import CommandError
from ..keys import CONFIG
from ..marks import parse_mark
from ..twilio.media_stream import dtmf_digit
from ..twilio.session import TwilioSession, carrier_socket
from . import protocol, xml
from .protocol import ClearedAudio, Dtmf, Media, PlayedStream, Start, StreamMessage
from .rest import PLIVO_REST
from .signatures import verify_plivo

log = logging.getLogger(__name__)

BYTES_PER_MS = protocol.SAMPLE_RATE // 1000  # µ-law: one byte per sample


def add_routes(app: web.Application) -> None:
    """Register ``/plivo/stream``."""
    app.router.add_get(xml.STREAM_PATH, audio_stream)


async def audio_stream(request: web.Request) -> web.WebSocketResponse:
    """Check the upgrade's signature, then run the socket as its own session."""
    await verify_plivo(request)
    ws = carrier_socket(request.app[CONFIG])
    await ws.prepare(request)
    await PlivoStreamSession(request.app, ws, call_id=request.query.get("call_id", "")).run()
    return ws


class PlivoStreamSession(TwilioSession):
    """One Plivo audio-stream socket."""

    protocol: ClassVar[str] = "plivo_stream"
    needs_stream_token: ClassVar[bool] = False  # its upgrade's nonce is good once (replays.py)
    streams_audio: ClassVar[bool] = True  # a media message every 20 ms

    def __init__(self, app: web.Application, ws: web.WebSocketResponse, *,
                 call_id: str) -> None:
        super().__init__(app, ws)
        self.plivo = app[PLIVO_REST]
        self.url_call_id = call_id
        self.stream_id = ""
        self.last_sequence = 0
        self.seq_base = 0  # added to Plivo's sequenceNumber: the call's frames keep growing
        self.audio_bytes = 0
        frames = self.metrics.loop_counter("gateway_frames", "Audio frames relayed",
                                           ["protocol", "direction"])  # counted every frame
        self._frames_in = frames.labels(self.protocol, "in")
        self._frames_out = frames.labels(self.protocol, "out")

    async def on_text(self, data: str) -> None:
        """Dispatch one message of the stream protocol."""
        message = protocol.decode_message(data)
        if isinstance(message, UnknownMessage):
            self.ignore(message)
            return
        self._check_order(message)
        if isinstance(message, Start):
            await self._start(message)
            return
        if not self.started:
            raise ProtocolViolation(CloseCode.NOT_STARTED,
                                    f"{protocol.event_name(message)} before start")
        if message.stream_id and message.stream_id != self.stream_id:
            raise ProtocolViolation(CloseCode.POLICY_VIOLATION,
                                    f"unknown stream {message.stream_id[:40]!r}")
        match message:
            case Media():
                await self._media(message)
            case PlayedStream():
                name = clean_text(message.name)
                turn_id, seq = parse_mark(name)
                await self.publish(AgentSpeechProgress(
                    org_id=self._org, call_id=self.call_id, turn_id=turn_id,
                    mark=name, seq=seq))
            case Dtmf():
                await self.publish(CallDtmf(org_id=self._org, call_id=self.call_id,
                                            digit=dtmf_digit(message.dtmf.digit)))
            case ClearedAudio():
                log.debug("call %s: Plivo cleared the queued audio", self.call_id)

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
        media_format = details.media_format
        if (media_format.encoding != protocol.CONTENT_TYPE
                or media_format.sample_rate != protocol.SAMPLE_RATE):
            raise ProtocolViolation(CloseCode.INVALID_MESSAGE, "unsupported media format "
                                    f"{media_format.encoding[:30]}@{media_format.sample_rate}")
        if not is_token(details.stream_id):  # stored (milestone) and published as it is
            raise ProtocolViolation(CloseCode.INVALID_MESSAGE, "start without a valid streamId")
        self.stream_id = details.stream_id
        self.seq_base = stream_seq_base(self.clock())
        await self.attach(details.call_id, {"call_id": self.url_call_id}, self.stream_id)

    async def _media(self, message: Media) -> None:
        chunk = message.media
        if chunk.track != "inbound":
            return
        try:
            audio = base64.b64decode(chunk.payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolViolation(CloseCode.INVALID_PAYLOAD,
                                    f"media {message.sequence_number}: invalid base64") from None
        if audio:
            try:
                await publish_frame(self.bus.nc, self.call_id, "in", audio,
                                    seq=self.seq_base + message.sequence_number,
                                    timestamp_ms=self.audio_bytes // BYTES_PER_MS)
            except OutboundBufferLimitError:
                self.audio_refused()
            else:
                self._frames_in.inc()
            self.audio_bytes += len(audio)

    # -- outwards ---------------------------------------------------------------------------

    async def subscribe(self) -> None:
        """Relay the agent's audio frames (and checkpoints) to Plivo."""
        self.add_subscription(await subscribe_frames(self.bus.nc, self.call_id, "out",
                                                     self._out_frame))

    async def _out_frame(self, payload: bytes, seq: int, timestamp_ms: int, msg: Msg) -> None:
        if not await self.send(protocol.play_audio(base64.b64encode(payload).decode())):
            return
        self._frames_out.inc()
        name = (msg.headers or {}).get(MARK)
        if name:
            await self.send(protocol.checkpoint(self.stream_id, name))

    async def clear(self) -> None:
        """Flush the audio Plivo has queued (barge-in)."""
        await self.send_or_refuse("clear", protocol.clear_audio(self.stream_id))

    async def mark(self, name: str) -> None:
        """Ask Plivo to echo ``name`` (playedStream) once the audio sent so far has played."""
        await self.send_or_refuse("mark", protocol.checkpoint(self.stream_id, name))

    # -- call control through Plivo's REST API ----------------------------------------------

    async def hang_up_at_carrier(self, reason: str) -> None:
        """Plivo's REST API hangs the call up.

        Without the REST client (or if it fails), close this socket: the redirect that follows
        the stream then finds the call ended and hangs up.
        """
        call = self.call
        assert call is not None
        if self.plivo is not None:
            try:
                await self.plivo.hangup(call.carrier_call_id)
                return
            except Exception:
                log.exception("call %s: REST hang-up failed; closing the socket", self.call_id)
        await self.end_locally(reason)

    async def send_digits(self, digits: str) -> None:
        """Play DTMF to the caller through the REST API."""
        call = self.call
        if call is None:
            raise CommandError("no call attached yet")
        if self.plivo is None:
            raise CommandError("sending DTMF needs the Plivo REST client")
        await self.plivo.send_digits(call.carrier_call_id, digits)

    async def transfer(self, to: str, mode: Literal["cold", "warm"]) -> None:
        """Cold transfer: point the caller's leg at our ``<Dial>`` XML.

        call.transferred and call.ended (reason ``transferred``) are published once Plivo has
        accepted the transfer; if it fails, the call stays live with the agent.
        """
        call = self.call
        if call is None:
            raise CommandError("no call attached yet")
        if self.plivo is None:
            raise CommandError("transfer needs the Plivo REST client (no account configured)")
        await self.refuse_if_ended()
        await self.plivo.transfer(call.carrier_call_id, xml.callback_url(
            self.config, xml.TRANSFER_PATH, call_id=call.call_id, to=to))
        await self.end_transferred(to, mode)
