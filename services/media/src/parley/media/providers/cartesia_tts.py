"""Cartesia TTS through the cartesia SDK's WebSocket (``/tts/websocket``).

One WebSocket per provider, opened on the first ``open`` and shared by every turn (saving a
handshake per turn); one Cartesia *context* per :class:`CartesiaTtsStream` (agent turn). A
reader task routes each message to its context's stream; if the socket fails, every stream on
it fails with a transient :class:`ProviderError` and the next ``open`` reconnects.

The model is ``sonic-3`` (all of Cartesia's 42 languages): Cartesia sunset ``sonic-2`` on
2026-06-01 for all but en, de, es, fr, ja, ko, pt and zh.

Each ``say`` is one generation request in the turn's context: raw 8 kHz ``pcm_mulaw`` out,
``add_timestamps``, ``continue`` true except on the last clause. Cartesia does not label audio
with the request that produced it, but it does number *flushes*: a flush makes the server finish
everything sent before it, answer ``flush_done``, and tag the audio that follows with the next
``flush_id`` (audio before the first flush has 1). A flush is sent the one way Cartesia
documents it (its "Context Flushing and Flush IDs" page, the SDK's ``push("", flush=True)``): a
request of its own in the context, empty ``transcript``, ``continue: true``, ``flush: true``.
(We used to set ``flush`` on the clause's own request, a form the docs never describe, so how
the server would number it was a guess.) So every clause but the last is followed by a flush
(``flush_clauses=True``, the default), and a chunk's clause is its ``flush_id`` - 1 (or, when
the server omits ``flush_id``, the number of ``flush_done`` seen so far). The cost is that
Cartesia cannot buffer text across a clause boundary, which the turn's clauses, being whole
phrases, do not need; the context still carries prosody from one to the next. With
``flush_clauses=False`` audio is attributed to the latest clause sent (approximate).

Word timestamps come in ``timestamps`` messages, in seconds; they are made relative to their
clause's first audio sample (the protocol's convention) and delivered as :class:`TtsChunk` with
empty audio and the words, in stream order. Cartesia's docs do not say whether, after a flush,
they count from the start of the context's audio or from the flush, so both are taken: a
clause's first timestamp that starts before half of the audio the context had produced before
that clause is counted from the flush (its clause's start), any other from the context's start.

``cancel`` sends Cartesia's cancel for the context and ends ``audio()`` at once; anything still
arriving for the context is dropped. A context that goes quiet while audio is owed fails after
``stall_after_s`` (:class:`StallWatchdog`) and takes the shared socket down with it.

Errors: an HTTP 4xx refusal of the upgrade (bad key, …) and 4xx ``error`` messages (bad voice,
bad request) are permanent, but for 408 and 429 (its concurrency limit); everything else is
transient. A permanent ``error`` message (but 401, 402, 403) is ``call_specific``: a refusal of
the turn's request (its model, language, voice), not a sign Cartesia is down. An ``error``
naming no context (Cartesia sends ``context_id`` only "when available") fails at once every
turn waiting for audio, the one it concerns among them; dropped, that turn stalled, and its
watchdog took the shared socket and every other turn down with it. It fails them transiently,
whatever its status: which call it was about cannot be told, and taken as a permanent refusal
every call waiting on the socket gave Cartesia up for the rest of the call.

The socket is opened without permessage-deflate: the audio is base64 of µ-law, which deflate
barely shrinks, at a CPU cost on both ends and a compressor's memory per socket.

SDK quirks: the SDK's ``send`` silently reconnects a closed socket (dropping its contexts), and
its own per-context listener swallows a closed socket (``receive()`` then waits forever); so this
module never uses the SDK's context helper or its ``send``: it reads the socket itself
(``recv_bytes``), writes requests straight to the SDK's connection, and stops sending on a
connection it has seen fail. Requests are JSON this module builds with msgspec and messages are
decoded with msgspec: the SDK's ``send`` runs each request through its TypedDict transform
(~100 µs, and our requests come out unchanged) and its ``parse_event`` builds pydantic models
(~10 µs a message, ~2,000 messages a second at 250 calls).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from cartesia import AsyncCartesia
from websockets.exceptions import InvalidStatus

from parley.media.providers.base import ProviderError, TtsChunk, WordTiming
from parley.media.providers.watchdog import StallWatchdog

if TYPE_CHECKING:  # the SDK keeps its WebSocket classes in a private module
    from cartesia.lib._tts import AsyncTTSResourceConnection

PROVIDER = "cartesia"
DEFAULT_VOICE = "6ccbfb76-1fc6-48f7-b71d-91ac6298247b"
OUTPUT_FORMAT = {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}
BYTES_PER_SECOND = 8000
_END = None  # queue sentinel
_CLOSE_TIMEOUT_S = 3.0
log = logging.getLogger(__name__)


def _permanent(status: int) -> bool:
    """Whether a refusal with this HTTP(-like) status is for good: a 4xx but 408 and 429.

    429 is Cartesia's concurrency limit (concurrency_limited: too many contexts active at once
    across the account, a peak of calls), as transient as a 5xx; taken as permanent, the call
    refused Cartesia for the rest of it (ProviderRouter.open, CallSession._speak).
    """
    return 400 <= status < 500 and status not in (408, 429)


def _refusal(status: int, message: str) -> ProviderError:
    """An ``error`` message's failure: a 4xx but the account's (401, 402, 403) is the call's.

    The socket is up and Cartesia answered: it will not do this request (a model sunset for the
    call's language, the call's voice), which other calls' requests are not refused for; so
    it does not count against Cartesia's health (``call_specific``).
    """
    permanent = _permanent(status)
    return ProviderError(PROVIDER, message, permanent=permanent,
                         call_specific=permanent and status not in (401, 402, 403))


# -- Cartesia's WebSocket messages (the fields used; others are ignored) ------------------------

class _WordTimestamps(msgspec.Struct):
    words: list[str] = msgspec.field(default_factory=list)
    start: list[float] = msgspec.field(default_factory=list)
    end: list[float] = msgspec.field(default_factory=list)


class Chunk(msgspec.Struct, tag="chunk", tag_field="type"):
    """Audio for a context: base64 of the output format."""

    context_id: str
    data: str = ""
    flush_id: int | None = None


class Timestamps(msgspec.Struct, tag="timestamps", tag_field="type"):
    """Word timestamps, in seconds from the context's start or the last flush (module doc)."""

    context_id: str
    flush_id: int | None = None
    word_timestamps: _WordTimestamps | None = None


class FlushDone(msgspec.Struct, tag="flush_done", tag_field="type"):
    """Everything sent before a flush has been answered."""

    context_id: str
    flush_id: int = 0


class Done(msgspec.Struct, tag="done", tag_field="type"):
    """The context is finished: no more audio."""

    context_id: str


class Error(msgspec.Struct, tag="error", tag_field="type"):
    """A failed request (for a context) or connection."""

    context_id: str | None = None
    status_code: int | None = None
    title: str | None = None
    message: str | None = None


class _Other(msgspec.Struct):
    type: str = ""
    context_id: str | None = None


Message = Chunk | Timestamps | FlushDone | Done | Error
_decoder = msgspec.json.Decoder(Message)
_other_decoder = msgspec.json.Decoder(_Other)
_encoder = msgspec.json.Encoder()


def decode_message(data: str | bytes) -> Message | None:
    """One server message (None: a type this module has no use for, logged)."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        try:
            other = _other_decoder.decode(data)
            log.warning("skipping a Cartesia %r message (context %s)", other.type,
                        other.context_id)
        except msgspec.DecodeError:
            log.warning("skipping an undecodable Cartesia message: %s", exc)
        return None


def _urls(base_url: str) -> tuple[str, str]:
    """The HTTP and WebSocket base URLs for ``base_url`` (either scheme)."""
    parts = urlsplit(base_url.rstrip("/"))
    secure = parts.scheme in ("https", "wss")
    http = urlunsplit(("https" if secure else "http", parts.netloc, parts.path, "", ""))
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, parts.path, "", ""))
    return http, ws


class CartesiaTts:
    """Opens Cartesia synthesis streams over one shared WebSocket (implements ``TtsProvider``)."""

    name = PROVIDER

    def __init__(self, api_key: str, *, base_url: str | None = None, model_id: str = "sonic-3",
                 voice_id: str = DEFAULT_VOICE, stall_after_s: float = 3.0,
                 flush_clauses: bool = True) -> None:
        if not api_key:
            raise ProviderError(PROVIDER, "no API key", permanent=True)
        http, ws = _urls(base_url) if base_url else (None, None)
        self._client = AsyncCartesia(api_key=api_key, base_url=http, websocket_base_url=ws)
        self._tts = self._client.tts  # the SDK loads it on first use: now, before start-up ends
        self._model_id = model_id
        self._voice_id = voice_id
        self._stall_after_s = stall_after_s
        self._flush_clauses = flush_clauses
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def open(self, *, voice: str = "", language: str = "en-US") -> CartesiaTtsStream:
        """Start a turn: a new context on the shared socket (connecting it if needed)."""
        connection = await self._connect()
        request = {"model_id": self._model_id, "voice": {"id": voice or self._voice_id},
                   "output_format": OUTPUT_FORMAT, "language": language.split("-")[0].lower(),
                   "add_timestamps": True}
        return CartesiaTtsStream(connection, request, flush_clauses=self._flush_clauses,
                                 stall_after_s=self._stall_after_s)

    async def close(self) -> None:
        """Close the shared socket (failing any turn still on it) and the SDK client."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await self._client.close()

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._connection is not None and self._connection.error is None:
                return self._connection
            if self._connection is not None:
                await self._connection.close()
                self._connection = None
            try:
                socket = await self._tts.websocket_connect(
                    websocket_connection_options={"compression": None}).enter()
            except InvalidStatus as exc:
                status = exc.response.status_code
                raise ProviderError(PROVIDER, f"connect refused: HTTP {status}",
                                    permanent=_permanent(status)) from exc
            except Exception as exc:
                raise ProviderError(PROVIDER, f"connect failed: {exc!r}") from exc
            self._connection = _Connection(socket)
            return self._connection


class _Connection:
    """The shared socket: sends requests, routes answers to streams by context id."""

    def __init__(self, socket: AsyncTTSResourceConnection) -> None:
        self.socket = socket
        self.streams: dict[str, CartesiaTtsStream] = {}
        self.error: ProviderError | None = None
        self._reader = asyncio.create_task(self._read(), name="cartesia-tts-read")

    async def send(self, request: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        try:
            await self.socket._connection.send(_encoder.encode(request).decode())
        except Exception as exc:
            self.fail(ProviderError(PROVIDER, f"send failed: {exc!r}"))
            raise self.error from exc  # type: ignore[misc]

    def fail(self, error: ProviderError) -> None:
        """Mark the socket dead and fail every stream on it."""
        self.error = self.error or error
        for stream in list(self.streams.values()):
            stream.fail(self.error)

    async def close(self) -> None:
        self.fail(ProviderError(PROVIDER, "connection closed"))
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        # Already broken (nothing to release cleanly) or wedged: bound the close handshake.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.socket.close(), _CLOSE_TIMEOUT_S)

    def _unattributed(self, event: Error) -> None:
        """An error naming no context: it fails every turn waiting for audio now, transiently.

        Whose request it was about cannot be told (one of them at most), so it is no call's
        refusal, even with a 4xx: each turn is taken up again (or by a fallback) for this turn
        only, and no call on the socket gives Cartesia up for good over it.
        """
        status = event.status_code or 0
        log.warning("Cartesia error for no context: %s %s: %s; the turns waiting for audio "
                    "fail, transiently", status, event.title, event.message)
        # Nor is it held against Cartesia's health once per turn failed: a request's own
        # refusal (a 4xx but an account's or a limit's) not at all, anything else once.
        counted = not (400 <= status < 500 and status not in (401, 402, 403, 408, 429))
        message = f"{status} {event.title}: {event.message} (for no context)"
        for stream in [stream for stream in self.streams.values() if stream.awaiting_audio]:
            stream.fail(ProviderError(PROVIDER, message, counted=counted))
            counted = False

    async def _read(self) -> None:
        try:
            while True:
                event = decode_message(await self.socket.recv_bytes())
                stream = self.streams.get(event.context_id or "") if event else None
                if stream is not None:
                    stream.receive(event)
                elif isinstance(event, Error) and event.context_id is None:
                    self._unattributed(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # closed or broken: every open turn fails, transiently
            self.fail(ProviderError(PROVIDER, f"socket failed: {exc!r}"))


class CartesiaTtsStream:
    """One agent turn in one Cartesia context (implements ``TtsStream``); see the module doc."""

    def __init__(self, connection: _Connection, request: dict[str, Any], *,
                 flush_clauses: bool, stall_after_s: float) -> None:
        self.context_id = str(uuid.uuid4())
        self._connection = connection
        self._request = {**request, "context_id": self.context_id}
        self._flush_clauses = flush_clauses
        self._chunks: asyncio.Queue[TtsChunk | None] = asyncio.Queue()
        self._error: ProviderError | None = None
        self._ended = False
        self._text_closed = False
        self._clauses_sent = 0
        self._flushes_done = 0
        self._clause = 0  # clause of the audio now arriving
        self._clause_start_s = 0.0  # where that clause's audio starts in the context
        self._stamps_origin_s: float | None = None  # what the clause's timestamps count from
        self._audio_s = 0.0
        self._watchdog = StallWatchdog(PROVIDER, stall_after_s, self._stalled)
        connection.streams[self.context_id] = self

    async def say(self, text: str, *, last: bool = False) -> None:
        """Send a clause into the context (``continue`` unless ``last``)."""
        if self._ended:
            if self._error is not None:
                raise self._error
            return  # cancelled: the turn is over
        if self._text_closed:
            raise RuntimeError("say() after the last clause")
        self._text_closed = last
        self._clauses_sent += 1
        await self._connection.send({**self._request, "transcript": text, "continue": not last})
        if self._flush_clauses and not last:  # the documented flush: a request of its own
            await self._connection.send(
                {**self._request, "transcript": "", "continue": True, "flush": True})
        self._watchdog.expect()

    async def audio(self) -> AsyncIterator[TtsChunk]:
        """Chunks in order until the context is done or cancelled; failures raise."""
        while (chunk := await self._chunks.get()) is not _END:
            yield chunk
        if self._error is not None:
            raise self._error

    async def cancel(self) -> None:
        """Cancel the context at Cartesia and end ``audio()`` now."""
        if self._ended:
            return
        self._end()
        with contextlib.suppress(ProviderError):  # a dead socket has nothing left to cancel
            await self._connection.send({"context_id": self.context_id, "cancel": True})

    def receive(self, event: Message) -> None:
        """One message for this context, from the connection's reader."""
        if self._ended:
            return
        match event:
            case Chunk():
                self._enter_clause(self._clause_of(event.flush_id))
                audio = base64.b64decode(event.data) if event.data else b""
                self._audio_s += len(audio) / BYTES_PER_SECOND
                self._chunks.put_nowait(TtsChunk(audio, [], self._clause))
            case Timestamps(word_timestamps=stamps) if stamps is not None:
                self._enter_clause(self._clause_of(event.flush_id))
                offset = self._stamps_origin(stamps)
                words = [WordTiming(word, max(0.0, start - offset), max(0.0, end - offset))
                         for word, start, end in zip(stamps.words, stamps.start, stamps.end,
                                                     strict=False)]
                self._chunks.put_nowait(TtsChunk(b"", words, self._clause))
            case FlushDone():
                self._flushes_done += 1
            case Done():
                self._end()
                return
            case Error():
                status = event.status_code or 0
                self.fail(_refusal(status, f"{status} {event.title}: {event.message}"))
                return
        self._watchdog.feed(more_expected=self._owed())

    def fail(self, error: ProviderError) -> None:
        """End the turn with ``error`` (raised at the end of ``audio()``)."""
        if self._ended:
            return
        self._error = error
        self._end()

    def _clause_of(self, flush_id: int | None) -> int:
        if not self._flush_clauses:
            return max(self._clauses_sent - 1, 0)
        return flush_id - 1 if flush_id else self._flushes_done

    def _enter_clause(self, clause: int) -> None:
        if clause > self._clause:
            self._clause = clause
            self._clause_start_s = self._audio_s
            self._stamps_origin_s = None

    def _stamps_origin(self, stamps: _WordTimestamps) -> float:
        """Where the clause's timestamps count from, in the clause's audio (see the module doc).

        Decided on the clause's first timestamp: one well before the clause's audio can start
        (under half of it) was counted from the flush that began the clause, not from the
        context's start.
        """
        if self._stamps_origin_s is None and stamps.start:
            restarted = stamps.start[0] < self._clause_start_s / 2
            self._stamps_origin_s = 0.0 if restarted else self._clause_start_s
        return self._clause_start_s if self._stamps_origin_s is None else self._stamps_origin_s

    def _owed(self) -> bool:
        """Whether Cartesia still owes this context audio (so silence would be a stall)."""
        if self._text_closed:
            return True  # until done
        return self._flush_clauses and self._flushes_done < self._clauses_sent

    @property
    def awaiting_audio(self) -> bool:
        """Whether text was sent that Cartesia has not finished answering."""
        return not self._ended and self._clauses_sent > 0 and (
            self._owed() or not self._flush_clauses)

    def _end(self) -> None:
        self._ended = True
        self._watchdog.stop()
        self._connection.streams.pop(self.context_id, None)
        self._chunks.put_nowait(_END)

    def _stalled(self) -> None:
        error = self._watchdog.error()
        self.fail(error)
        self._connection.fail(error)  # a wedged socket would stall the next turn too
