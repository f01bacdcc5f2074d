"""Deepgram live STT through the deepgram-sdk ``listen.v1`` WebSocket.

Caller audio goes out exactly as it arrives, 8 kHz µ-law (``encoding=mulaw``,
``sample_rate=8000``): no transcoding. The agent's language goes out as a code Deepgram takes:
the tag itself if it is one of the few regional codes nova-3 knows ("en-US", "pt-BR", "fr-CA"),
else its language ("de-DE" → "de"); Deepgram refuses the upgrade (HTTP 400) for a code it has
no model for. The socket asks for interim results, endpointing,
``utterance_end_ms``, VAD events and smart formatting; answers map onto the protocol as
``Results`` → :class:`Partial` (interim; empty ones are dropped) or :class:`Final` (``is_final``;
``speech_final`` carried over), ``SpeechStarted`` → :class:`SpeechStarted`, ``UtteranceEnd`` →
:class:`UtteranceEnd`. An empty final is passed on: Deepgram sends them through silence, and
one that follows an interim retracts it (the "uh" of a breath or a cough was no word after all);
dropped, the interim stuck to the turn, which then waited for the max wait and ended on it.

Deepgram closes a socket that hears nothing for ~10 s, so when no audio has gone out for
``keepalive_after_s`` a ``KeepAlive`` is sent. ``finalize()`` sends ``Finalize``; ``close()``
sends ``CloseStream`` and waits (bounded) for the last results and ``Metadata``.

Failures: an HTTP 4xx refusal of the upgrade (bad key 401, bad request 400, no credit 402,
forbidden 403) is a permanent :class:`ProviderError` from ``open``; so is a socket Deepgram
closes with 1008 ``DATA-0000``, raised at the end of ``events()``: audio it cannot decode (not
audio, or a codec it does not take), which its docs say to fix in the encoding and sample rate.
Taken as transient, the same audio was sent again to be refused again, for ever. The 400 (the
call's language or settings) and the 1008 (the call's audio) are ``call_specific``: Deepgram is
up and serves other calls, so they do not count against its health; 401, 402 and 403 (the
account's) do. Anything else
(refused connection, 408 or 429 (too many streams at once), 5xx, a socket closed with another
error, a server ``Error`` message, a stall caught by the :class:`StallWatchdog`) is transient,
raised by ``open`` or at the end of ``events()``. So is a socket the server closes cleanly
(1000/1001: Deepgram, a load balancer or a proxy going away) before our ``CloseStream``:
``events()`` ends normally only after ``close()``, so a call is never left listening to a
socket that is gone.

The socket is opened without permessage-deflate: µ-law audio barely compresses, and each
socket's deflate state costs ~190 KB and CPU on both ends for every 100 ms of audio sent (media
at 250 calls: 342 → 151 KB of RSS per call).

Server messages are decoded here, with msgspec, from the text frames of the socket the SDK
opened (its ``_websocket``): the SDK's own iterator parses each one with ``json.loads`` and
then tries the seven pydantic models of its response union in turn, ~45 µs a message against
~3 µs. At 250 calls that is ~600 messages a second (results through silence included) on the
media process's one core. The SDK still opens, authenticates and configures the socket and
sends everything that goes out.

SDK quirks: deepgram-sdk 7.x imports ``websockets.legacy`` and the deprecated
``InvalidStatusCode``, which warn on import; the import is done here with those
DeprecationWarnings silenced so a ``-W error`` test run can load it. Its ``listen.v1`` client
opens the socket with websockets' defaults, which offer permessage-deflate, and has no option
for it, so this module wraps that client's connector with ``compression=None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from parley.media.providers.base import (
    Final,
    Partial,
    ProviderError,
    SpeechStarted,
    SttEvent,
    UtteranceEnd,
    WordTiming,
)
from parley.media.providers.watchdog import StallWatchdog

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from deepgram import AsyncDeepgramClient
    from deepgram.core.api_error import ApiError
    from deepgram.environment import DeepgramClientEnvironment
    from deepgram.listen.v1 import client as _listen_client
    from deepgram.listen.v1 import raw_client as _listen_raw_client  # noqa: F401 (warns)
    from deepgram.listen.v1.socket_client import AsyncV1SocketClient

PROVIDER = "deepgram"
_UNDECODABLE_CLOSE = 1008  # Deepgram documents it for DATA-0000 only: audio it cannot decode


# -- Deepgram's server messages (the fields used; others are ignored) ---------------------------

class _Word(msgspec.Struct):
    word: str
    start: float
    end: float
    punctuated_word: str | None = None


class _Alternative(msgspec.Struct):
    transcript: str = ""
    confidence: float = 0.0
    words: list[_Word] = msgspec.field(default_factory=list)


class _Channel(msgspec.Struct):
    alternatives: list[_Alternative] = msgspec.field(default_factory=list)


class _Results(msgspec.Struct, tag="Results", tag_field="type"):
    channel: _Channel
    start: float = 0.0
    duration: float = 0.0
    is_final: bool = False
    speech_final: bool | None = None


class _SpeechStarted(msgspec.Struct, tag="SpeechStarted", tag_field="type"):
    timestamp: float


class _UtteranceEnd(msgspec.Struct, tag="UtteranceEnd", tag_field="type"):
    last_word_end: float


class _Error(msgspec.Struct, tag="Error", tag_field="type"):
    description: str = ""
    variant: str = ""


class _Other(msgspec.Struct):
    type: str = ""


_Message = _Results | _SpeechStarted | _UtteranceEnd | _Error
_message_decoder = msgspec.json.Decoder(_Message)
_other_decoder = msgspec.json.Decoder(_Other)
_QUIET_TYPES = frozenset({"Metadata", "ConfigureSuccess"})  # nothing in them for a stream


def decode_message(text: str | bytes) -> SttEvent | None:
    """The protocol event for one Deepgram server message (None: nothing to report).

    An ``Error`` message raises :class:`ProviderError`; a message of a type this module does
    not know is logged and skipped, as the SDK does.
    """
    try:
        message = _message_decoder.decode(text)
    except msgspec.DecodeError as exc:
        try:
            kind = _other_decoder.decode(text).type
        except msgspec.DecodeError:
            kind = ""
        if kind not in _QUIET_TYPES:
            log.warning("skipping a Deepgram message %s: %s", kind or "(undecodable)", exc)
        return None
    return _event(message)


def _without_compression(connect: Callable[..., Any]) -> Callable[..., Any]:
    """``connect`` (the SDK's websockets connector) with no permessage-deflate offered."""
    if getattr(connect, "parley_uncompressed", False):
        return connect

    def uncompressed(uri: str, **kwargs: Any) -> Any:
        return connect(uri, compression=None, **kwargs)

    uncompressed.parley_uncompressed = True  # type: ignore[attr-defined]
    return uncompressed


_SDK_CONNECT = "websockets_client_connect"  # what listen.v1's client opens its sockets with
setattr(_listen_client, _SDK_CONNECT, _without_compression(getattr(_listen_client, _SDK_CONNECT)))

log = logging.getLogger(__name__)
# 4xx but 408 and 429: over the concurrency limit (429, a peak of calls) is as transient as a
# 5xx; taken as permanent, the call refused Deepgram for the rest of it (ProviderRouter.open).
_PERMANENT_STATUSES = frozenset(range(400, 500)) - {408, 429}
# Of those, the account's refusals (bad key, no credit, forbidden): every call gets them, so they
# count against Deepgram's health; any other (400: a language it has no model for) is the call's.
_ACCOUNT_STATUSES = frozenset({401, 402, 403})
# The regional codes Deepgram's nova-3 takes (its "Models & Languages Overview" and changelog);
# for any other tag only the language itself is sent: "de-DE" → "de", "es-MX" → "es".
_REGIONAL_CODES = {code.lower(): code for code in (
    "en-US", "en-AU", "en-GB", "en-IN", "en-NZ", "es-419", "fr-CA", "pt-BR", "pt-PT", "de-CH",
    "nl-BE", "sv-SE", "da-DK", "ko-KR", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant")}


def deepgram_language(tag: str) -> str:
    """The ``language`` code for a BCP-47 tag: Deepgram refuses (HTTP 400) regions it lacks."""
    tag = tag.strip().replace("_", "-")
    return _REGIONAL_CODES.get(tag.lower()) or tag.split("-")[0].lower() or "en"
_END = None  # queue sentinel


def _environment(base_url: str) -> DeepgramClientEnvironment:
    """An SDK environment for ``base_url`` (``http(s)://`` or ``ws(s)://``, no path)."""
    parts = urlsplit(base_url.rstrip("/"))
    secure = parts.scheme in ("https", "wss")
    http = urlunsplit(("https" if secure else "http", parts.netloc, parts.path, "", ""))
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, parts.path, "", ""))
    return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


class DeepgramStt:
    """Opens Deepgram live recognition streams (implements ``SttProvider``)."""

    name = PROVIDER

    def __init__(self, api_key: str, *, base_url: str | None = None, model: str = "nova-3",
                 endpointing_ms: int = 300, utterance_end_ms: int = 1000,
                 smart_format: bool = True, keepalive_after_s: float = 4.0,
                 stall_after_s: float = 5.0, close_timeout_s: float = 3.0) -> None:
        if not api_key:
            raise ProviderError(PROVIDER, "no API key", permanent=True)
        environment = (_environment(base_url) if base_url
                       else DeepgramClientEnvironment.PRODUCTION)
        self._client = AsyncDeepgramClient(api_key=api_key, environment=environment)
        self._listen = self._client.listen.v1  # the SDK loads it on first use: now, at start-up
        self._model = model
        self._endpointing_ms = endpointing_ms
        self._utterance_end_ms = utterance_end_ms
        self._smart_format = smart_format
        self._keepalive_after_s = keepalive_after_s
        self._stall_after_s = stall_after_s
        self._close_timeout_s = close_timeout_s

    async def open(self, *, language: str = "en-US",
                   endpointing_ms: int | None = None) -> DeepgramSttStream:
        """Connect a live socket for one stream of 8 kHz µ-law.

        ``endpointing_ms`` is this stream's ``endpointing``; None: the provider's.
        """
        exits = contextlib.AsyncExitStack()
        endpointing = endpointing_ms if endpointing_ms is not None else self._endpointing_ms
        connection = self._listen.connect(
            model=self._model, language=deepgram_language(language), encoding="mulaw",
            sample_rate="8000",
            channels="1", interim_results="true", endpointing=str(endpointing),
            utterance_end_ms=str(self._utterance_end_ms), vad_events="true",
            smart_format="true" if self._smart_format else "false")
        try:
            socket = await exits.enter_async_context(connection)
        except ApiError as exc:
            status = exc.status_code or 0
            raise ProviderError(PROVIDER, f"connect refused: HTTP {status} {exc.body}",
                                permanent=status in _PERMANENT_STATUSES,
                                call_specific=(status in _PERMANENT_STATUSES
                                               and status not in _ACCOUNT_STATUSES)) from exc
        except Exception as exc:
            raise ProviderError(PROVIDER, f"connect failed: {exc!r}") from exc
        return DeepgramSttStream(socket, exits, keepalive_after_s=self._keepalive_after_s,
                                 stall_after_s=self._stall_after_s,
                                 close_timeout_s=self._close_timeout_s)


class DeepgramSttStream:
    """One call's Deepgram socket (implements ``SttStream``); see the module docstring."""

    def __init__(self, socket: AsyncV1SocketClient, exits: contextlib.AsyncExitStack, *,
                 keepalive_after_s: float, stall_after_s: float,
                 close_timeout_s: float) -> None:
        self._socket = socket
        self._exits = exits
        self._keepalive_after_s = keepalive_after_s
        self._close_timeout_s = close_timeout_s
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._loop.time()
        self._events: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self._error: ProviderError | None = None
        self._closing = False
        self._closed = False
        self._watchdog = StallWatchdog(PROVIDER, stall_after_s, self._stalled)
        self._reader = asyncio.create_task(self._read(), name="deepgram-stt-read")
        self._keepalive = asyncio.create_task(self._keep_alive(), name="deepgram-stt-keepalive")

    async def send(self, ulaw: bytes) -> None:
        """Send caller audio (8 kHz µ-law) as it is."""
        if not ulaw:
            return
        await self._send(self._socket.send_media, ulaw)
        self._watchdog.expect()

    async def finalize(self) -> None:
        """Send ``Finalize``: Deepgram answers with finals for everything heard so far."""
        await self._send(self._socket.send_finalize)
        self._watchdog.expect()

    async def events(self) -> AsyncIterator[SttEvent]:
        """Events in order until the socket closes; a failure raises :class:`ProviderError`."""
        while (event := await self._events.get()) is not _END:
            yield event
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Send ``CloseStream``, wait (bounded) for the last results, release the socket."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._keepalive.cancel()
        if self._error is None and not self._reader.done():
            with contextlib.suppress(Exception):
                await self._socket.send_close_stream()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), self._close_timeout_s)
        self._watchdog.stop()
        self._reader.cancel()
        await asyncio.gather(self._reader, self._keepalive, return_exceptions=True)
        # The socket may already be gone (nothing to save), or wedged: bound the close handshake.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._exits.aclose(), self._close_timeout_s)

    async def _send(self, method: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._closed:
            raise RuntimeError("send on a closed Deepgram stream")
        if self._error is not None:
            raise self._error
        try:
            await method(*args)
        except Exception as exc:
            undecodable = _undecodable(exc)
            raise (undecodable or ProviderError(PROVIDER, f"send failed: {exc!r}")) from exc
        self._last_sent = self._loop.time()

    async def _read(self) -> None:
        try:
            async for message in self._socket._websocket:  # raw frames: see the module doc
                self._watchdog.feed()
                if isinstance(message, bytes):
                    continue  # Deepgram sends text only
                event = decode_message(message)
                if event is not None:
                    self._events.put_nowait(event)
            if not self._closing:  # a clean close (1000/1001) we did not ask for: going away
                websocket = self._socket._websocket
                code = getattr(websocket, "close_code", None)
                reason = getattr(websocket, "close_reason", "") or ""
                self._error = self._error or ProviderError(
                    PROVIDER, f"socket closed by the server: {code} {reason}".rstrip())
        except asyncio.CancelledError:
            pass
        except ProviderError as exc:
            self._error = self._error or exc
        except Exception as exc:  # the socket failed: surfaced through events()
            if not self._closing:
                self._error = self._error or _socket_failed(exc)
        finally:
            self._watchdog.stop()
            self._keepalive.cancel()
            self._events.put_nowait(_END)

    async def _keep_alive(self) -> None:
        while True:
            idle = self._loop.time() - self._last_sent
            if idle >= self._keepalive_after_s:
                # No audio for a while (the caller's stream, or NATS, cut off mid-word):
                # Deepgram keeps the last of it unanswered until more comes (Finalize answers
                # only "a noticeable amount" buffered). Owed, it was taken for a stall, and a
                # NATS outage switched every call to the fallback and opened the breaker.
                self._watchdog.withdraw()
                try:
                    await self._socket.send_keep_alive()
                except Exception:  # the reader sees the broken socket and reports it
                    return
                self._last_sent = self._loop.time()
                idle = 0.0
            await asyncio.sleep(self._keepalive_after_s - idle)

    def _stalled(self) -> None:
        self._error = self._error or self._watchdog.error()
        self._reader.cancel()


def _undecodable(exc: BaseException) -> ProviderError | None:
    """Deepgram's close for audio it cannot decode (1008 DATA-0000) as a permanent error.

    Its "STT Troubleshooting WebSocket, NET, and DATA Errors" page: the payload is not audio or
    a codec it does not support, to be fixed in the encoding and sample rate, not retried (the
    same audio would be refused again). None for any other failure.
    """
    close = getattr(exc, "rcvd", None)  # websockets' ConnectionClosed: the server's Close frame
    if getattr(close, "code", None) != _UNDECODABLE_CLOSE:
        return None
    reason = getattr(close, "reason", "") or "DATA-0000"
    return ProviderError(PROVIDER, f"socket closed by the server: {_UNDECODABLE_CLOSE} {reason}",
                         call_specific=True)  # the call's audio (the encoding is fixed here)


def _socket_failed(exc: BaseException) -> ProviderError:
    return _undecodable(exc) or ProviderError(PROVIDER, f"socket failed: {exc!r}")


def _event(message: _Message) -> SttEvent | None:
    match message:
        case _Error(variant=variant, description=description):
            raise ProviderError(PROVIDER, f"{variant}: {description}")
        case _Results(channel=channel, is_final=is_final) if channel.alternatives:
            best = channel.alternatives[0]
            text = best.transcript.strip()
            if not is_final:
                return Partial(text) if text else None
            words = [WordTiming(word.punctuated_word or word.word, word.start, word.end)
                     for word in best.words]
            start_s = words[0].start if words else message.start
            end_s = words[-1].end if words else message.start + message.duration
            return Final(text, words, confidence=best.confidence, start_s=start_s, end_s=end_s,
                         speech_final=bool(message.speech_final))
        case _SpeechStarted(timestamp=timestamp):
            return SpeechStarted(timestamp)
        case _UtteranceEnd(last_word_end=last_word_end):
            return UtteranceEnd(last_word_end)
    return None
