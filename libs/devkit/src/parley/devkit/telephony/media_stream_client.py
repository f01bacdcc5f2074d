"""Twilio's end of one Media Stream: the WebSocket client the simulator and the emulator share.

It connects to the ``<Stream url>`` (signed, as Twilio signs upgrades), sends ``connected`` and
``start``, then one 20 ms ``media`` frame every 20 ms of the injected clock — the script's
utterances, µ-law silence (0xFF) between them — and DTMF when due. What the server sends goes
through :class:`~.playback.Playback`: marks are echoed when the audio before them has played,
``clear`` flushes and echoes at once. It hangs up (``stop``, then close) when the script says
or :meth:`MediaStreamClient.hang_up` is called, and stops when the server closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import aiohttp
import numpy as np

from parley.devkit.telephony import twilio_protocol as tp
from parley.devkit.telephony.audio_codec import Pcm, place_segments, ulaw_decode, wav_bytes
from parley.devkit.telephony.call_script import CallScript, Speaker
from parley.devkit.telephony.playback import (
    AudioStarted,
    AudioStopped,
    Cleared,
    MarkReached,
    Playback,
    PlaybackEvent,
)
from parley.devkit.telephony.webhook_client import UrlMap

Log = Callable[[float, str], None]  # (seconds since the stream started, what happened)


class Clock(Protocol):
    """Time for pacing; tests inject a fake one."""

    def now(self) -> float:
        """Seconds, monotonic."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)


class StreamError(RuntimeError):
    """The stream could not be opened (refused upgrade, unreachable server)."""


@dataclass
class Turn:
    """One caller utterance and how long the agent took to answer it."""

    index: int
    label: str
    started_at: float  # seconds since the stream started
    ended_at: float | None = None  # when its last frame was sent
    first_agent_audio_at: float | None = None  # first agent media received after the end

    @property
    def latency_ms(self) -> float | None:
        """End of the utterance → first agent audio frame received, in ms."""
        if self.ended_at is None or self.first_agent_audio_at is None:
            return None
        return (self.first_agent_audio_at - self.ended_at) * 1000


@dataclass
class StreamOutcome:
    """What happened on one stream."""

    stream_sid: str
    stop_reason: str  # "hangup_after", "script_ended", "gateway_closed", or the hang_up reason
    duration: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    digits_sent: list[str] = field(default_factory=list)
    caller_audio: bytes = b""  # every frame sent, from the stream's start
    agent_audio: list[tuple[float, bytes]] = field(default_factory=list)  # (played at, µ-law)
    protocol_errors: list[str] = field(default_factory=list)

    def tracks(self) -> tuple[Pcm, Pcm]:
        """(caller, agent) as 8 kHz PCM of equal length, agent audio where it was played."""
        caller = ulaw_decode(self.caller_audio)
        agent = place_segments(self.agent_audio, len(caller))
        padded = np.zeros(len(agent), dtype=np.int16)
        padded[: len(caller)] = caller
        return padded, agent

    def write_wav(self, path: str | Path) -> Path:
        """A stereo 16-bit 8 kHz WAV: caller left, agent right."""
        target = Path(path)
        target.write_bytes(wav_bytes(self.tracks()))
        return target


class MediaStreamClient:
    """Plays Twilio on one ``<Connect><Stream>``; :meth:`run` returns the outcome."""

    def __init__(self, *, session: aiohttp.ClientSession, url: str,
                 custom_parameters: Mapping[str, str], auth_token: str, account_sid: str,
                 call_sid: str, script: CallScript, url_map: UrlMap | None = None,
                 clock: Clock | None = None, log: Log | None = None,
                 stream_sid: str | None = None) -> None:
        self._session, self._url, self._auth_token = session, url, auth_token
        self._parameters = dict(custom_parameters)
        self._url_map = url_map or UrlMap()
        self._clock = clock or MonotonicClock()
        self._log: Log = log or (lambda _at, _text: None)
        self._script = script
        self._speaker = Speaker(script)
        self._messages = tp.StreamMessages(stream_sid=stream_sid or tp.new_sid("MZ"),
                                           account_sid=account_sid, call_sid=call_sid)
        self.outcome = StreamOutcome(stream_sid=self._messages.stream_sid, stop_reason="")
        self._t0 = 0.0
        self._playback = Playback(lambda: self._clock.now() - self._t0)
        self._send_lock = asyncio.Lock()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._remote_closed = False
        self._hangup_reason: str | None = None
        self._awaiting_answer: Turn | None = None
        self._caller_audio = bytearray()

    @property
    def stream_sid(self) -> str:
        """The stream's SID (``MZ…``)."""
        return self._messages.stream_sid

    def hang_up(self, reason: str = "hangup") -> None:
        """End the stream at the next frame: send ``stop`` and close."""
        self._hangup_reason = self._hangup_reason or reason

    async def run(self) -> StreamOutcome:
        """Connect, stream until hang-up or close, and return the outcome."""
        target = self._url_map.actual_for(self._url)
        headers = {tp.SIGNATURE_HEADER: tp.websocket_signature(self._auth_token, self._url)}
        try:
            ws = await self._session.ws_connect(target, headers=headers, autoping=True)
        except aiohttp.WSServerHandshakeError as error:
            raise StreamError(f"{self._url} (at {target}) refused the upgrade: "
                              f"{error.status} {error.message}") from error
        except aiohttp.ClientError as error:
            raise StreamError(f"{self._url} (at {target}): {error}") from error
        async with ws:
            self._ws = ws
            await self._send(self._messages.connected)
            self._t0 = self._clock.now()
            await self._send(partial(self._messages.start, self._parameters))
            self._log(0.0, f"stream {self.stream_sid} started {self._parameters}")
            receiver = asyncio.create_task(self._receive(ws))
            try:
                self.outcome.stop_reason = await self._stream()
                if not self._remote_closed:
                    await self._send(self._messages.stop)
                await ws.close()  # a clean close handshake; also ends the receiver's loop
            finally:
                if not receiver.done():
                    receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
        now = self._clock.now() - self._t0
        self._playback.finish()
        self.outcome.duration = now
        self.outcome.agent_audio = self._playback.played()
        self.outcome.caller_audio = bytes(self._caller_audio)
        self._log(now, f"stream ended: {self.outcome.stop_reason}")
        return self.outcome

    async def _stream(self) -> str:
        frame = 0
        while True:
            now = frame * tp.FRAME_SECONDS
            delay = self._t0 + now - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
            if self._remote_closed:
                return "gateway_closed"
            if self._hangup_reason:
                return self._hangup_reason
            if self._script.hangup_after is not None and now >= self._script.hangup_after:
                return "hangup_after"
            await self._apply(self._playback.poll())
            for press in self._speaker.key_presses_due(now):
                await self._send(partial(self._messages.dtmf, press.digit))
                self.outcome.digits_sent.append(press.digit)
                self._log(now, f"caller pressed {press.digit}")
            step = self._speaker.frame(now)
            if step.started is not None:
                self._awaiting_answer = None
                turns = self.outcome.turns
                turns.append(Turn(len(turns) + 1, step.started.label, now))
                over = " (over the agent)" if self._playback.playing else ""
                self._log(now, f"caller says {step.started.label} "
                               f"({step.started.seconds:.2f} s){over}")
            await self._send(partial(self._messages.media, step.audio, round(now * 1000)))
            self._caller_audio += step.audio
            if step.ended is not None:
                turn = self.outcome.turns[-1]
                turn.ended_at, self._awaiting_answer = now, turn
                self._log(now, f"caller finished {step.ended.label}")
            if self._script.hang_up_when_done and self._speaker.finished(now):
                return "script_ended"
            frame += 1

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                self._error(f"unexpected {message.type.name} frame")
                continue
            try:
                parsed = tp.parse_server_message(message.data)
            except tp.ProtocolError as error:
                self._error(f"bad message from the server: {error}")
                continue
            if parsed.stream_sid != self.stream_sid:
                self._error(f"message for unknown stream {parsed.stream_sid!r}")
                continue
            await self._on_server_message(parsed)
        self._remote_closed = True

    async def _on_server_message(self, message: tp.ServerMessage) -> None:
        now = self._clock.now() - self._t0
        match message:
            case tp.ServerMedia():
                turn = self._awaiting_answer
                if turn is not None and turn.first_agent_audio_at is None:
                    turn.first_agent_audio_at = now
                    self._log(now, f"agent audio received: turn {turn.index} latency "
                                   f"{turn.latency_ms:.0f} ms")
                self._playback.enqueue_audio(message.audio())
                await self._apply(self._playback.poll())
            case tp.ServerMark(mark=mark):
                self._playback.enqueue_mark(mark.name)
                await self._apply(self._playback.poll())
            case tp.Clear():
                await self._apply(self._playback.clear())

    async def _apply(self, events: list[PlaybackEvent]) -> None:
        for event in events:
            match event:
                case AudioStarted(at=at):
                    self._speaker.agent_started(at)
                    self._log(at, "agent audio started")
                case AudioStopped(at=at):
                    self._speaker.agent_stopped(at)
                    self._log(at, "agent audio stopped")
                case MarkReached(at=at, name=name, cleared=cleared):
                    await self._send(partial(self._messages.mark, name))
                    self.outcome.marks_echoed.append(name)
                    self._log(at, f"mark {name!r} echoed" + (" (cleared)" if cleared else ""))
                case Cleared(at=at, dropped_seconds=dropped):
                    self._log(at, f"clear: {dropped:.2f} s of agent audio dropped")

    async def _send(self, build: Callable[[], tp.TwilioMessage]) -> None:
        """Number and send a message; the lock keeps sequence numbers in wire order."""
        if self._ws is None or self._remote_closed:
            return
        async with self._send_lock:
            try:
                await self._ws.send_str(tp.encode(build()))
            except ConnectionResetError:
                self._remote_closed = True

    def _error(self, text: str) -> None:
        self.outcome.protocol_errors.append(text)
        self._log(self._clock.now() - self._t0, f"protocol error: {text}")
