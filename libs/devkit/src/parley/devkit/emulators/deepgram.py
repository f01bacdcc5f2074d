"""A Deepgram live-transcription emulator: ``GET /v1/listen`` upgraded to a WebSocket.

It checks ``Authorization: Token <key>`` before the upgrade (401 with Deepgram's JSON error
otherwise), reads the query the deepgram-sdk sends (``encoding`` mulaw/linear16,
``sample_rate``, ``interim_results``, ``endpointing``, ``utterance_end_ms``, ``vad_events``,
``smart_format``/``punctuate``; a ``language`` nova-3 does not list is refused with 400, as
Deepgram refuses it), takes binary audio and the JSON controls ``KeepAlive``,
``Finalize`` and ``CloseStream``, and answers with Deepgram-shaped ``Results``,
``SpeechStarted``, ``UtteranceEnd`` and, on close, ``Metadata``.

Transcripts are scripted: :class:`DeepgramEmulator` holds a queue of utterance texts, and each
stretch of speech it detects in the audio (20 ms frames whose mean ``|pcm|`` reaches
``energy_threshold``) consumes the next one. Everything is timed in *audio* time (bytes
received), so results do not depend on how fast a test sends: ``SpeechStarted`` at the first
loud frame, interim ``Results`` every ``interim_every_s`` revealing one more word per
``seconds_per_word``, a final ``Results`` with ``speech_final`` false for what was said so far
every ``final_every_s`` of continuous speech (Deepgram finalizes a long utterance in pieces,
every few seconds), a final ``Results`` (``is_final`` and ``speech_final``) once
``endpointing`` ms of silence follow the speech, or at once on ``Finalize`` (``from_finalize``),
then ``UtteranceEnd`` after ``utterance_end_ms`` of silence (at once after a Finalize). Silence
gets an empty final ``Results`` every ``silence_result_s``, as the real service does. A script
entry wrapped in :class:`Retracted` is shown in interims and then taken back: its final is empty
(and no ``UtteranceEnd`` follows), as Deepgram does with a cough or a breath it first heard as
"uh".

A socket that gets neither audio nor a ``KeepAlive`` for ``idle_timeout_s`` (Deepgram: 10 s) is
closed with 1011 ``NET-0001``, as Deepgram's "Audio Keep Alive" page says it is.

Fault switches (:class:`DeepgramFaults`, changeable while a session runs): ``stall`` keeps the
socket open but answers nothing, ``close_with_error`` closes with 1011 on the next message,
``undecodable_audio`` closes with 1008 ``DATA-0000`` on the next audio (Deepgram's close for a
payload it "cannot decode as audio": not audio, or a codec it does not support; its "STT
Troubleshooting WebSocket, NET, and DATA Errors" page),
``reject_status`` refuses the upgrade with that HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
from aiohttp import WSMsgType, web

from parley.devkit.emulators import EmulatorServer, run_cli
from parley.devkit.telephony.audio_codec import ulaw_decode

MODEL_INFO = {"name": "2-general-nova", "version": "2024-01-18.26916", "arch": "nova-3"}
_ENCODINGS = {"mulaw", "linear16"}
# The ``language`` codes nova-3 takes (Deepgram's "Models & Languages Overview" and changelog,
# 2025-08 to 2026-03): base codes and only these regional ones; any other ("de-DE", "fr-FR",
# "es-ES") is refused with HTTP 400 at the upgrade, as the real service refuses a model and
# language it has no model for. Checked only for ``model=nova-3`` (the other models' lists
# differ).
NOVA_3_LANGUAGES = frozenset({
    "multi", "en", "en-US", "en-AU", "en-GB", "en-IN", "en-NZ", "es", "es-419", "fr", "fr-CA",
    "pt", "pt-BR", "pt-PT", "de", "de-CH", "nl", "nl-BE", "sv", "sv-SE", "da", "da-DK", "it",
    "tr", "no", "id", "ja", "ko", "ko-KR", "hi", "ru", "uk", "vi", "pl", "cs", "bg", "fi", "hu",
    "ca", "et", "el", "lv", "lt", "ms", "ro", "sk", "be", "bn", "bs", "hr", "kn", "mk", "mr",
    "sr", "sl", "ta", "tl", "te", "zh", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant",
})
# Deepgram's close payload for audio it cannot decode (its DATA-0000 description).
DATA_0000 = (b"DATA-0000: The payload cannot be decoded as audio. It is either not audio data "
             b"or is a codec unsupported by Deepgram.")
_ULAW_ABS = np.abs(ulaw_decode(bytes(range(256))).astype(np.int32))  # µ-law byte → |sample|
_FRAME_LEVELS: dict[bytes, int] = {}  # µ-law 20 ms frame → its summed |sample| (a memo)
_FRAME_LEVELS_MAX = 4096
_MEMO_FRAMES = 10  # chunks of up to this many frames take the memo; longer ones numpy's sums
_MODEL_UUID = str(uuid.uuid5(uuid.NAMESPACE_DNS, MODEL_INFO["name"]))
_NOT_WORD = re.compile(r"[^\w']")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Retracted:
    """A script entry heard in interims that its final takes back (empty transcript)."""

    text: str


@dataclass
class DeepgramFaults:
    """Switches a test flips to make the emulator misbehave."""

    stall: bool = False
    close_with_error: bool = False
    undecodable_audio: bool = False  # the next audio is closed with 1008 DATA-0000
    reject_status: int | None = None


@dataclass
class ListenSession:
    """What one ``/v1/listen`` connection sent and received (for assertions)."""

    params: dict[str, str]
    extensions: str = ""  # the client's Sec-WebSocket-Extensions offer ("": none)
    audio_bytes: int = 0
    keepalives: int = 0
    finalizes: int = 0
    close_stream: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RecognizerSettings:
    """How the scripted recogniser paces its answers (audio seconds)."""

    energy_threshold: float = 300.0
    interim_every_s: float = 0.3
    seconds_per_word: float = 0.25
    silence_result_s: float = 1.0
    final_every_s: float = 3.0  # speech finalized mid-utterance (speech_final false) this often


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "false").lower() == "true"


def _milliseconds(params: dict[str, str], name: str, default: int | None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if value.lower() == "false":
        return None
    return int(value)


class ScriptedRecognizer:
    """Turns audio into Deepgram messages following a script (pure: no I/O, audio-time clock)."""

    def __init__(self, params: dict[str, str], script: deque[str | Retracted],
                 settings: RecognizerSettings) -> None:
        self.rate = int(params.get("sample_rate", "8000"))
        self.encoding = params.get("encoding", "mulaw")
        self.interim = _flag(params, "interim_results")
        self.vad_events = _flag(params, "vad_events")
        self.punctuated = _flag(params, "smart_format") or _flag(params, "punctuate")
        self.endpointing_ms = _milliseconds(params, "endpointing", 10)
        self.utterance_end_ms = _milliseconds(params, "utterance_end_ms", None)
        self.settings = settings
        self.request_id = str(uuid.uuid4())
        self._script = script
        self._frame_bytes = self.rate // 50 * (1 if self.encoding == "mulaw" else 2)
        self._pending = b""
        self.position_s = 0.0
        self._speaking = False
        self._words: list[str] = []
        self._retracted = False  # the utterance's final takes its interims back
        self._utterance_start = 0.0
        self._segment_start = 0.0  # start of the utterance's speech not yet in a final
        self._done_words = 0  # the utterance's words already in finals
        self._last_loud_end = 0.0
        self._last_interim = 0.0
        self._window_start = 0.0  # start of audio not yet covered by a final
        self._last_word_end: float | None = None  # owed an UtteranceEnd after this

    def audio(self, data: bytes) -> list[dict[str, Any]]:
        """Consume audio; return the messages it triggers."""
        out: list[dict[str, Any]] = []
        data = self._pending + data
        usable = len(data) - len(data) % self._frame_bytes
        self._pending = data[usable:]
        if not usable:
            return out
        threshold = self.settings.energy_threshold * (self.rate // 50)
        if self.encoding == "mulaw" and usable <= _MEMO_FRAMES * self._frame_bytes:
            # A few 20 ms frames (media sends 5 at a time): each frame's level looked up if seen
            # before (a caller's silence is the same bytes every time), else summed as below.
            size = self._frame_bytes
            for offset in range(0, usable, size):
                frame = data[offset:offset + size]
                level = _FRAME_LEVELS.get(frame)
                if level is None:
                    if len(_FRAME_LEVELS) >= _FRAME_LEVELS_MAX:
                        _FRAME_LEVELS.clear()
                    level = _FRAME_LEVELS[frame] = int(
                        _ULAW_ABS[np.frombuffer(frame, np.uint8)].sum())
                out.extend(self._frame(level >= threshold, size))
            return out
        # Every whole 20 ms frame's mean absolute level, in one pass over the chunk.
        if self.encoding == "mulaw":
            levels = _ULAW_ABS[np.frombuffer(data, dtype=np.uint8, count=usable)]
        else:
            levels = np.abs(np.frombuffer(data, dtype="<i2", count=usable // 2).astype(np.int32))
        frames = levels.reshape(-1, self.rate // 50)
        for loud in (frames.sum(axis=1) >= threshold).tolist():
            out.extend(self._frame(loud, frames.shape[1]))
        return out

    def finalize(self) -> list[dict[str, Any]]:
        """``Finalize``: the open utterance (if any) becomes final now, then UtteranceEnd."""
        if not self._speaking:
            return [self._result(self._window_start, self.position_s, [], is_final=True,
                                 speech_final=False, from_finalize=True)]
        out = [self._final(from_finalize=True)]
        out.extend(self._utterance_end())
        return out

    def close(self) -> list[dict[str, Any]]:
        """``CloseStream``: flush the open utterance, then the session's ``Metadata``."""
        out = [self._final(from_finalize=False)] if self._speaking else []
        out.append({
            "type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
            "sha256": "0" * 64, "created": datetime.now(UTC).isoformat(),
            "duration": round(self.position_s, 3), "channels": 1,
            "models": [_MODEL_UUID], "model_info": {_MODEL_UUID: MODEL_INFO},
        })
        return out

    def _frame(self, loud: bool, samples: int) -> Iterable[dict[str, Any]]:
        start = self.position_s
        self.position_s = end = start + samples / self.rate
        if loud:
            if not self._speaking:
                self._speaking = True
                self._last_word_end = None  # speech resumed: no UtteranceEnd for the last one
                entry = self._script.popleft() if self._script else ""
                self._retracted = isinstance(entry, Retracted)
                self._words = (entry.text if isinstance(entry, Retracted) else entry).split()
                self._utterance_start = self._segment_start = self._last_interim = start
                self._done_words = 0
                if self.vad_events:
                    yield {"type": "SpeechStarted", "channel": [0], "timestamp": round(start, 3)}
            self._last_loud_end = end
            if self.interim and end - self._last_interim >= self.settings.interim_every_s:
                self._last_interim = end
                heard = int((end - self._utterance_start) / self.settings.seconds_per_word) + 1
                shown = min(heard, max(len(self._words) - 1, 1), len(self._words))
                if shown > self._done_words:
                    words = self._timings(self._words[self._done_words:shown],
                                          self._segment_start, end)
                    yield self._result(self._window_start, end, words, is_final=False,
                                       speech_final=False)
            if not self._retracted and end - self._segment_start >= self.settings.final_every_s:
                heard = int((end - self._utterance_start) / self.settings.seconds_per_word) + 1
                upto = min(heard, len(self._words) - 1)  # the last word waits for the end
                if upto > self._done_words:
                    words = self._timings(self._words[self._done_words:upto],
                                          self._segment_start, end)
                    yield self._result(self._window_start, end, words, is_final=True,
                                       speech_final=False)
                    self._done_words = upto
                    self._segment_start = self._window_start = end
            return
        silence_ms = (end - self._last_loud_end) * 1000
        if self._speaking and self.endpointing_ms is not None and silence_ms >= self.endpointing_ms:
            yield self._final(from_finalize=False)
        if self._last_word_end is not None and self.utterance_end_ms is not None \
                and (end - self._last_word_end) * 1000 >= self.utterance_end_ms:
            yield from self._utterance_end()
        if not self._speaking and end - self._window_start >= self.settings.silence_result_s:
            yield self._result(self._window_start, end, [], is_final=True, speech_final=False)
            self._window_start = end

    def _final(self, *, from_finalize: bool) -> dict[str, Any]:
        end = max(self._last_loud_end, self._segment_start + 0.1)
        words = [] if self._retracted else self._timings(self._words[self._done_words:],
                                                         self._segment_start, end)
        message = self._result(self._window_start, self.position_s, words, is_final=True,
                               speech_final=True, from_finalize=from_finalize)
        self._speaking = False
        self._window_start = self.position_s
        self._last_word_end = words[-1]["end"] if words else None
        return message

    def _utterance_end(self) -> list[dict[str, Any]]:
        if self._last_word_end is None:
            return []
        message = {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self._last_word_end}
        self._last_word_end = None
        return [message]

    def _timings(self, words: list[str], start: float, end: float) -> list[dict[str, Any]]:
        """Spread ``words`` over ``[start, end]`` by length, as Deepgram word objects."""
        total = sum(len(word) + 1 for word in words)
        span = end - start
        timed: list[dict[str, Any]] = []
        done = 0
        for word in words:
            begin = start + done / total * span
            done += len(word) + 1
            timed.append({"word": _NOT_WORD.sub("", word).lower() or word,
                          "start": round(begin, 3), "end": round(start + done / total * span, 3),
                          "confidence": 0.99, "punctuated_word": word})
        return timed

    def _result(self, start: float, end: float, words: list[dict[str, Any]], *,
                is_final: bool, speech_final: bool, from_finalize: bool = False
                ) -> dict[str, Any]:
        key = "punctuated_word" if self.punctuated else "word"
        message: dict[str, Any] = {
            "type": "Results", "channel_index": [0, 1], "duration": round(end - start, 3),
            "start": round(start, 3), "is_final": is_final, "speech_final": speech_final,
            "channel": {"alternatives": [{
                "transcript": " ".join(word[key] for word in words),
                "confidence": 0.99 if words else 0.0, "words": words}]},
            "metadata": {"request_id": self.request_id, "model_info": MODEL_INFO,
                         "model_uuid": _MODEL_UUID},
        }
        if from_finalize:
            message["from_finalize"] = True
        return message


class DeepgramEmulator(EmulatorServer):
    """The emulator: scripted utterances, latency, faults and a record of every session."""

    def __init__(self, *, api_key: str = "test-deepgram-key",
                 utterances: Iterable[str | Retracted] = (),
                 latency_s: float = 0.0, settings: RecognizerSettings | None = None,
                 idle_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.api_key = api_key
        self.idle_timeout_s = idle_timeout_s
        self.script: deque[str | Retracted] = deque(utterances)
        self.latency_s = latency_s
        self.settings = settings or RecognizerSettings()
        self.faults = DeepgramFaults()
        self.sessions: list[ListenSession] = []

    def create_app(self) -> web.Application:
        """``GET /v1/listen`` (WebSocket)."""
        app = web.Application()
        app.router.add_get("/v1/listen", self._listen)
        return app

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        if self.faults.reject_status is not None:
            return _error(self.faults.reject_status, "REJECTED", "Rejected by fault injection.")
        if request.headers.get("Authorization", "") != f"Token {self.api_key}":
            return _error(401, "INVALID_AUTH", "Invalid credentials.")
        params = dict(request.query)
        if params.get("encoding", "mulaw") not in _ENCODINGS or "sample_rate" not in params:
            return _error(400, "Bad Request", "unsupported encoding or missing sample_rate")
        if params.get("model") == "nova-3" and params.get("language", "en") not in NOVA_3_LANGUAGES:
            return _error(400, "Bad Request", "No such model/language/tier combination found.")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.sockets.add(ws)
        session = ListenSession(params, request.headers.get("Sec-WebSocket-Extensions", ""))
        self.sessions.append(session)
        recognizer = ScriptedRecognizer(params, self.script, self.settings)
        outbox: asyncio.Queue[tuple[float, dict[str, Any]] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(ws, session, outbox), name="deepgram-emulator")
        loop = asyncio.get_running_loop()

        def post(messages: list[dict[str, Any]]) -> None:
            for message in messages:
                outbox.put_nowait((loop.time() + self.latency_s, message))

        heard = loop.time()  # the last audio or KeepAlive: Deepgram's NET-0001 clock
        try:
            while True:
                try:
                    message = await ws.receive(
                        timeout=max(0.001, heard + self.idle_timeout_s - loop.time()))
                except TimeoutError:
                    await ws.close(code=1011, message=b"NET-0001")
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                    WSMsgType.ERROR):
                    break
                if self.faults.close_with_error:
                    await ws.close(code=1011, message=b"NET-0001: fault injected")
                    break
                if message.type == WSMsgType.BINARY and self.faults.undecodable_audio:
                    await ws.close(code=1008, message=DATA_0000)
                    break
                if message.type == WSMsgType.BINARY:
                    heard = loop.time()
                    session.audio_bytes += len(message.data)
                    post(recognizer.audio(message.data))
                elif message.type == WSMsgType.TEXT:
                    control = json.loads(message.data).get("type")
                    if control == "KeepAlive":
                        heard = loop.time()
                        session.keepalives += 1
                    elif control == "Finalize":
                        session.finalizes += 1
                        post(recognizer.finalize())
                    elif control == "CloseStream" and not self.faults.stall:
                        session.close_stream = True
                        post(recognizer.close())
                        outbox.put_nowait(None)
                        await asyncio.shield(sender)
                        break
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.sockets.discard(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, session: ListenSession,
                    outbox: asyncio.Queue[tuple[float, dict[str, Any]] | None]) -> None:
        loop = asyncio.get_running_loop()
        while (item := await outbox.get()) is not None:
            due, message = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if self.faults.stall or ws.closed:
                continue
            session.sent.append(message)
            await ws.send_frame(_encode(message), WSMsgType.TEXT)
        await ws.close()


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
    return web.json_response(body, status=status)


def main(argv: list[str] | None = None) -> None:
    """``python -m parley.devkit.emulators.deepgram --port 0 --api-key KEY --utterance TEXT``."""
    def options(parser: Any) -> None:
        parser.add_argument("--api-key", default="test-deepgram-key")
        parser.add_argument("--utterance", action="append", default=[],
                            help="scripted transcript, one per detected utterance (repeatable)")
        parser.add_argument("--latency", type=float, default=0.0, help="seconds per result")

    run_cli(lambda args: DeepgramEmulator(api_key=args.api_key, utterances=args.utterance,
                                          latency_s=args.latency),
            "Deepgram live-transcription emulator", argv, options)


if __name__ == "__main__":
    main()
