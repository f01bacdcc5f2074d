"""A tiny stand-in gateway: TwiML, signed webhooks recorded, one Media Streams socket served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from parley.devkit.telephony import twilio_protocol as tp
from parley.devkit.telephony.audio_codec import ulaw_encode

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC" + "1" * 32
PUBLIC_URL = "https://gateway.example.test"
SILENT = bytes([0xFF]) * 160


def tone(frequency: float, seconds: float, rate: int = 8000, level: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.round(np.sin(2 * np.pi * frequency * t) * level * 32767).astype(np.int16)


AGENT_AUDIO = ulaw_encode(tone(1000, 0.2))  # 1600 bytes: 0.2 s


@dataclass
class Webhook:
    path: str
    params: dict[str, str]
    signature_valid: bool
    at: float
    url: str = ""
    signature: str = ""


@dataclass
class StandInGateway:
    """Records what "Twilio" does to it; answers like a minimal gateway."""

    validator: RequestValidator = field(default_factory=lambda: RequestValidator(AUTH_TOKEN))
    webhooks: list[Webhook] = field(default_factory=list)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    websocket_signature_valid: bool | None = None
    reply_to_speech: bool = True
    close_after_mark: bool = False
    stream_done: asyncio.Event = field(default_factory=asyncio.Event)
    mark_echoed: asyncio.Event = field(default_factory=asyncio.Event)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)

    def hooks(self, path: str) -> list[Webhook]:
        return [hook for hook in self.webhooks if hook.path == path]

    def events(self) -> list[str]:
        return [message["event"] for _, message in self.messages]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/twilio/voice", self._voice)
        app.router.add_post("/twilio/voice/reconnect", self._record_only)
        app.router.add_post("/twilio/status", self._record_only)
        app.router.add_post("/twilio/amd", self._record_only)
        app.router.add_post("/twilio/recording", self._record_only)
        app.router.add_get("/twilio/stream", self._stream)

        async def close_sockets(app: web.Application) -> None:
            for ws in list(self.sockets):
                await ws.close()

        app.on_shutdown.append(close_sockets)
        return app

    async def _record(self, request: web.Request) -> Webhook:
        params = {key: str(value) for key, value in (await request.post()).items()}
        url = PUBLIC_URL + request.path_qs
        signature = request.headers.get("X-Twilio-Signature", "")
        valid = self.validator.validate(url, params, signature)
        hook = Webhook(request.path, params, valid, asyncio.get_running_loop().time(), url,
                       signature)
        self.webhooks.append(hook)
        return hook

    async def _record_only(self, request: web.Request) -> web.Response:
        hook = await self._record(request)
        if not hook.signature_valid:
            return web.Response(status=403)
        return web.Response(text="<Response/>", content_type="text/xml")

    async def _voice(self, request: web.Request) -> web.Response:
        hook = await self._record(request)
        if not hook.signature_valid:
            return web.Response(status=403, text="bad signature")
        stream_url = PUBLIC_URL.replace("https://", "wss://") + "/twilio/stream"
        twiml = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response>'
            f'<Connect action="{PUBLIC_URL}/twilio/voice/reconnect">'
            f'<Stream url="{stream_url}">'
            f'<Parameter name="call_id" value="c-{hook.params["CallSid"][-6:]}"/>'
            f'<Parameter name="org" value="o1"/></Stream></Connect></Response>')
        return web.Response(text=twiml, content_type="text/xml")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        wss_url = PUBLIC_URL.replace("https://", "wss://") + request.path_qs
        self.websocket_signature_valid = self.validator.validate(
            wss_url, {}, request.headers.get("X-Twilio-Signature", ""))
        if not self.websocket_signature_valid:
            return web.Response(status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        loop = asyncio.get_running_loop()
        stream_sid, previous_speech, replies = "", False, 0
        try:
            async for frame in ws:
                message = json.loads(frame.data)
                self.messages.append((loop.time(), message))
                match message["event"]:
                    case "start":
                        stream_sid = message["streamSid"]
                        await self._speak(ws, stream_sid, "greeting")
                    case "media":
                        speech = tp.parse_twilio_message(frame.data).audio() != SILENT
                        if previous_speech and not speech and self.reply_to_speech:
                            replies += 1
                            await self._speak(ws, stream_sid, f"reply-{replies}")
                        previous_speech = speech
                    case "mark":
                        self.mark_echoed.set()
                        if self.close_after_mark:
                            await ws.close()
                    case "stop":
                        break
        finally:
            self.sockets.discard(ws)
            self.stream_done.set()
        return ws

    async def _speak(self, ws: web.WebSocketResponse, stream_sid: str, mark: str) -> None:
        await ws.send_str(tp.encode(tp.server_media(stream_sid, AGENT_AUDIO)))
        await ws.send_str(tp.encode(tp.server_mark(stream_sid, mark)))


async def serve(app: web.Application) -> tuple[str, Callable[[], Any]]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}", runner.cleanup


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[StandInGateway, str]]:
    stand_in = StandInGateway()
    url, cleanup = await serve(stand_in.app())
    yield stand_in, url
    await cleanup()
