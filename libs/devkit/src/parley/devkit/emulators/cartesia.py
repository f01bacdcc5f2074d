"""A Cartesia TTS emulator: the WebSocket the cartesia SDK opens at ``/tts/websocket``.

Authentication as the SDK sends it (``Authorization: Bearer <key>`` and a ``cartesia-version``
header) or as browsers do (``?api_key=…&cartesia_version=…``); a wrong key gets 401 before the
upgrade. Messages in: generation requests (``context_id``, ``model_id``, ``transcript``,
``voice``, ``output_format``, ``continue``, ``flush``, ``add_timestamps``, …) and
``{"context_id": …, "cancel": true}``. Messages out, Cartesia-shaped: ``chunk`` (base64 audio,
``flush_id``), ``timestamps`` (``word_timestamps`` ``{words, start, end}``, seconds from the
start of the context's audio), ``flush_done`` after a flush, ``done`` once a request with
``continue: false`` has been spoken, and ``error`` (with ``status_code``), also for a model (or a
model's language) Cartesia has sunset (``error_code`` "model_sunsetted").

Flushing, as Cartesia documents it (its "Context Flushing and Flush IDs" page, and the SDK's
``ctx.push("", flush=True)`` example): a request of its own for the context, with an empty
``transcript``, ``continue: true`` and ``flush: true``. Everything sent before it is spoken, then
``flush_done`` (``flush_id`` n) is sent, and the audio and timestamps of what follows carry
``flush_id`` n + 1 (those before the first flush carry 1). The docs say nothing of a flush sent
on a request that also carries text, or with ``continue: false``: the emulator speaks such a
request, then flushes, but records it in ``TtsSession.undocumented`` so a test can check that a
client relies on nothing the real server was never documented to do.

Whether word timestamps after a flush count from the start of the context or from the flush,
Cartesia's docs do not say: ``timestamps_restart_at_flush`` makes the emulator restart them at
each flush (default: from the start of the context), so a client can be tested against both.

Audio is deterministic and cheap: per word a tone (pitch from the word's letters) lasting
``seconds_per_character`` per character, then ``gap_s`` of silence, in the requested raw
encoding (``pcm_mulaw``, ``pcm_s16le`` or ``pcm_f32le``) and sample rate, cut into
``chunk_s`` chunks. The first chunk of a context waits ``first_byte_s``; after that audio is
produced ``speed`` times faster than real time. Cancel stops a context at once, silently.

A socket with no request and no generation for ``idle_timeout_s`` (Cartesia: 5 minutes, its
"Concurrency and WebSocket Limits" page) is closed by the server.

Faults (:class:`CartesiaFaults`): ``stall`` keeps the socket open but sends nothing more,
``error_status`` answers the next generation request with an ``error`` of that status (with
no ``context_id`` if ``error_without_context``: Cartesia's docs have it "present when
available"),
``reject_status`` refuses the upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from aiohttp import WSMsgType, web

from parley.devkit.emulators import EmulatorServer, run_cli
from parley.devkit.telephony.audio_codec import ulaw_encode

_REQUIRED = ("context_id", "model_id", "transcript", "voice", "output_format")
_RATES = {8000, 16000, 22050, 24000, 44100, 48000}
_ENCODINGS = {"pcm_mulaw", "pcm_s16le", "pcm_f32le"}
_encode_json = msgspec.json.Encoder().encode
# Cartesia's "API Changes" page: on 2026-06-01 these models stopped serving, and sonic-2 and
# sonic-turbo kept only these languages; a request for any other is an ``error`` with
# ``error_code`` "model_sunsetted". (sonic-3 and sonic-3.5 speak all 42 languages.)
_SUNSET_MODELS = frozenset({"sonic", "sonic-english", "sonic-multilingual",
                            "sonic-2-2025-03-07", "sonic-turbo-2025-03-07"})
_SONIC_2_LANGUAGES = frozenset({"en", "de", "es", "fr", "ja", "ko", "pt", "zh"})
_REDUCED_MODELS = {"sonic-2": _SONIC_2_LANGUAGES, "sonic-turbo": _SONIC_2_LANGUAGES | {"hi"}}


@dataclass
class CartesiaFaults:
    """Switches a test flips to make the emulator misbehave."""

    stall: bool = False
    error_status: int | None = None
    error_without_context: bool = False  # that error names no context_id
    reject_status: int | None = None


@dataclass
class TtsSession:
    """What one ``/tts/websocket`` connection received and sent (for assertions)."""

    version: str
    extensions: str = ""  # the client's Sec-WebSocket-Extensions offer ("": none)
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    undocumented: list[str] = field(default_factory=list)  # requests of no documented form
    idle_closed: bool = False  # closed by the emulator after idle_timeout_s with no generation


@dataclass(frozen=True)
class Voice:
    """How the emulator "speaks"."""

    seconds_per_character: float = 0.06
    gap_s: float = 0.04
    chunk_s: float = 0.1
    first_byte_s: float = 0.0
    speed: float = 20.0


def synthesise(word: str, rate: int, voice: Voice) -> np.ndarray:
    """A word's tone plus the gap after it, as float samples in [-1, 1]."""
    pitch = 180.0 + sum(map(ord, word)) % 24 * 15.0
    tone = np.arange(round(len(word) * voice.seconds_per_character * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * pitch * tone)
    return np.concatenate((samples, np.zeros(round(voice.gap_s * rate))))


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """Float samples in the requested raw encoding."""
    if encoding == "pcm_f32le":
        return samples.astype("<f4").tobytes()
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    return ulaw_encode(pcm) if encoding == "pcm_mulaw" else pcm.tobytes()


@functools.lru_cache(maxsize=512)
def _spoken(word: str, rate: int, encoding: str, voice: Voice) -> tuple[tuple[str, ...], int]:
    """A word's audio as the base64 ``data`` of its chunks, and its length in samples.

    Cached: the voice is deterministic, and a load test speaks the same words over and over.
    (A word is a few KB at 8 kHz µ-law, up to ~100 KB as 48 kHz float: 512 of them at most.)
    """
    samples = synthesise(word, rate, voice)
    size = max(1, round(voice.chunk_s * rate))
    return tuple(base64.b64encode(encode(samples[offset:offset + size], encoding)).decode()
                 for offset in range(0, samples.size, size)), samples.size


class _Context:
    """One context's generation: its requests, spoken in order by one task."""

    def __init__(self, context_id: str, post: Any, voice: Voice,
                 faults: CartesiaFaults, *, timestamps_restart_at_flush: bool = False) -> None:
        self.context_id = context_id
        self._restart_at_flush = timestamps_restart_at_flush
        self.requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = False  # a request with continue=false arrived
        self._post = post
        self._voice = voice
        self._faults = faults
        self._position_s = 0.0
        self._flushes = 0
        self._started = False
        self.task = asyncio.create_task(self._run(), name=f"cartesia-context-{context_id}")

    async def _run(self) -> None:
        while True:
            request = await self.requests.get()
            await self._speak(request)
            if request.get("flush"):
                self._flushes += 1
                if self._restart_at_flush:
                    self._position_s = 0.0
                await self._send({"type": "flush_done", "done": False, "flush_done": True,
                                  "flush_id": self._flushes, "status_code": 200})
            if not request.get("continue", True):
                await self._send({"type": "done", "done": True, "status_code": 200})
                return

    async def _speak(self, request: dict[str, Any]) -> None:
        output = request["output_format"]
        rate, encoding = int(output["sample_rate"]), output["encoding"]
        chunk_samples = max(1, round(self._voice.chunk_s * rate))
        for word in str(request["transcript"]).split():
            chunks, size = _spoken(word, rate, encoding, self._voice)
            if not self._started:
                self._started = True
                await asyncio.sleep(self._voice.first_byte_s)
            for number, data in enumerate(chunks):
                length = min(chunk_samples, size - number * chunk_samples)
                await asyncio.sleep(length / rate / self._voice.speed)
                await self._send({"type": "chunk", "data": data, "done": False,
                                  "status_code": 206, "step_time": 1.0,
                                  "flush_id": self._flushes + 1})
            start = self._position_s
            spoken = round(len(word) * self._voice.seconds_per_character, 6)
            self._position_s += size / rate
            if request.get("add_timestamps"):
                await self._send({
                    "type": "timestamps", "done": False, "status_code": 206,
                    "flush_id": self._flushes + 1,
                    "word_timestamps": {"words": [word], "start": [round(start, 6)],
                                        "end": [round(start + spoken, 6)]}})

    async def _send(self, message: dict[str, Any]) -> None:
        if not self._faults.stall:
            await self._post({**message, "context_id": self.context_id})


class CartesiaEmulator(EmulatorServer):
    """The emulator: deterministic voice, faults and a record of every session."""

    def __init__(self, *, api_key: str = "test-cartesia-key", voice: Voice | None = None,
                 idle_timeout_s: float = 300.0) -> None:
        super().__init__()
        self.api_key = api_key
        self.idle_timeout_s = idle_timeout_s
        self.voice = voice or Voice()
        self.timestamps_restart_at_flush = False  # see the module doc
        self.faults = CartesiaFaults()
        self.sessions: list[TtsSession] = []

    def create_app(self) -> web.Application:
        """``GET /tts/websocket`` (WebSocket)."""
        app = web.Application()
        app.router.add_get("/tts/websocket", self._websocket)
        return app

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if self.faults.reject_status is not None:
            return _http_error(self.faults.reject_status, "Rejected by fault injection")
        key = request.query.get("api_key") or request.headers.get(
            "Authorization", "").removeprefix("Bearer ")
        if key != self.api_key:
            return _http_error(401, "Invalid API key")
        version = (request.headers.get("cartesia-version")
                   or request.query.get("cartesia_version", ""))
        if not version:
            return _http_error(400, "Missing the Cartesia-Version header")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.sockets.add(ws)
        session = TtsSession(version, request.headers.get("Sec-WebSocket-Extensions", ""))
        self.sessions.append(session)
        contexts: dict[str, _Context] = {}
        sending = asyncio.Lock()

        async def post(message: dict[str, Any]) -> None:
            async with sending:
                if not ws.closed:
                    session.sent.append(message)
                    await ws.send_frame(_encode_json(message), WSMsgType.TEXT)

        loop = asyncio.get_running_loop()
        last = loop.time()  # the last request or the end of the last generation
        try:
            while True:
                try:
                    message = await ws.receive(
                        timeout=max(0.001, last + self.idle_timeout_s - loop.time()))
                except TimeoutError:
                    if any(not context.task.done() for context in contexts.values()):
                        last = loop.time()  # still generating: not idle
                        continue
                    session.idle_closed = True
                    await ws.close()
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                    WSMsgType.ERROR):
                    break
                last = loop.time()
                if message.type != WSMsgType.TEXT:
                    continue
                body = json.loads(message.data)
                context_id = str(body.get("context_id", ""))
                if body.get("cancel"):
                    session.cancels.append(context_id)
                    if (context := contexts.get(context_id)) is not None:
                        context.task.cancel()
                        context.closed = True
                    continue
                session.requests.append(body)
                problem = self._problem(body, contexts.get(context_id))
                if problem is not None:
                    status, text = problem
                    named = context_id and not self.faults.error_without_context
                    await post({"type": "error", "context_id": context_id if named else None,
                                "done": True,
                                "status_code": status, "title": "Invalid request",
                                "message": text, "error_code": "invalid_request"})
                    continue
                if _sunset(str(body["model_id"]), str(body.get("language", "en"))):
                    await post({"type": "error", "context_id": context_id, "done": True,
                                "status_code": 400, "error_code": "model_sunsetted",
                                "title": "Model sunsetted", "message": "The requested model "
                                "has been sunsetted and is no longer available."})
                    continue
                context = contexts.get(context_id)
                if context is None:
                    context = contexts[context_id] = _Context(
                        context_id, post, self.voice, self.faults,
                        timestamps_restart_at_flush=self.timestamps_restart_at_flush)
                if (reason := _undocumented(body)) is not None:
                    session.undocumented.append(reason)
                context.closed = not body.get("continue", True)
                context.requests.put_nowait(body)
        finally:
            for context in contexts.values():
                context.task.cancel()
            await asyncio.gather(*(c.task for c in contexts.values()), return_exceptions=True)
            self.sockets.discard(ws)
        return ws

    def _problem(self, body: dict[str, Any], context: _Context | None) -> tuple[int, str] | None:
        if self.faults.error_status is not None:
            status, self.faults.error_status = self.faults.error_status, None
            return status, "fault injected"
        missing = [name for name in _REQUIRED if name not in body]
        if missing:
            return 400, f"missing fields: {', '.join(missing)}"
        output = body["output_format"]
        if (not isinstance(output, dict) or output.get("container") != "raw"
                or output.get("encoding") not in _ENCODINGS
                or output.get("sample_rate") not in _RATES):
            return 400, f"unsupported output_format: {output!r}"
        if context is not None and context.closed:
            return 400, f"context {body['context_id']} is closed"
        return None


def _undocumented(body: dict[str, Any]) -> str | None:
    """Why a generation request has a form Cartesia does not document (None: it has one).

    A flush is documented only as a request of its own: empty transcript, ``continue: true``.
    """
    if not body.get("flush"):
        return None
    if str(body.get("transcript", "")):
        return f"flush sent with a transcript ({body['transcript']!r})"
    if not body.get("continue", False):
        return "flush sent with continue false"
    return None


def _sunset(model_id: str, language: str) -> bool:
    """Whether Cartesia no longer serves ``model_id`` in ``language`` (see _SUNSET_MODELS)."""
    if model_id in _SUNSET_MODELS:
        return True
    family = next((name for name in _REDUCED_MODELS
                   if model_id == name or model_id.startswith(f"{name}-")), None)
    return family is not None and language not in _REDUCED_MODELS[family]


def _http_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status_code": status}, status=status)


def main(argv: list[str] | None = None) -> None:
    """``python -m parley.devkit.emulators.cartesia --port 0 --api-key KEY``."""
    def options(parser: Any) -> None:
        parser.add_argument("--api-key", default="test-cartesia-key")
        parser.add_argument("--first-byte", type=float, default=0.0, help="seconds")

    run_cli(lambda args: CartesiaEmulator(api_key=args.api_key,
                                          voice=Voice(first_byte_s=args.first_byte)),
            "Cartesia TTS WebSocket emulator", argv, options)


if __name__ == "__main__":
    main()
