"""The two provider protocols the media service speaks: streaming STT and streaming TTS.

Audio at these boundaries is 8 kHz µ-law, the telephony wire format, so a provider that takes
µ-law directly (Deepgram, Cartesia) needs no transcoding; local providers convert inside.
Providers classify their failures: :class:`ProviderError` with ``permanent`` set for 4xx-style
errors (bad key, bad request) that retrying cannot fix, otherwise transient; and, among the
permanent ones, ``call_specific`` for a refusal of the call's own request (its language, model,
voice or audio) by a provider that is up and answering, which says nothing of its health.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec


class ProviderError(Exception):
    """A provider failed; ``permanent`` errors are not retried on the same provider.

    ``call_specific`` (implies ``permanent``): the provider answered and refused this call's
    own request (a language it has no model for, a model sunset for the call's language, the
    call's audio): the call does not ask it again, but its shared health is not marked down,
    as it serves other calls fine. An account's refusal (bad key, no credit) is not one: every
    call would get it. ``counted=False``: not held against the provider's health either,
    though not the call's own (an error the provider could not say whose request it was about,
    failing every turn waiting on a shared socket: counted once at most, not once per turn).
    """

    def __init__(self, provider: str, message: str, *, permanent: bool = False,
                 call_specific: bool = False, counted: bool = True) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.permanent = permanent or call_specific
        self.call_specific = call_specific
        self.counted = counted and not call_specific


class ProviderBusy(ProviderError):
    """The provider is healthy but has no room for another stream (a local model at capacity).

    Not a failure: the router moves on to the next provider without marking this one down.
    """

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(provider, message, permanent=True)


class WordTiming(msgspec.Struct, frozen=True, array_like=True):
    """A word and its start/end in seconds (from the stream start for STT, the clause for TTS)."""

    text: str
    start: float
    end: float


class SpeechStarted(msgspec.Struct, frozen=True, tag="speech_started"):
    """The provider heard speech begin (Deepgram vad_events / local VAD)."""

    at_s: float


class Partial(msgspec.Struct, frozen=True, tag="partial"):
    """An interim hypothesis of the current utterance."""

    text: str


class Final(msgspec.Struct, frozen=True, tag="final"):
    """A stable transcript segment; ``speech_final`` marks the provider's end of utterance.

    Its ``text`` may be empty: no words in that audio after all (the partial before it is
    taken back).
    """

    text: str
    words: list[WordTiming] = msgspec.field(default_factory=list)
    confidence: float = 1.0
    start_s: float = 0.0
    end_s: float = 0.0
    speech_final: bool = False


class UtteranceEnd(msgspec.Struct, frozen=True, tag="utterance_end"):
    """The provider's silence-based end of utterance (Deepgram UtteranceEnd)."""

    last_word_end_s: float


SttEvent = SpeechStarted | Partial | Final | UtteranceEnd


class SttStream(Protocol):
    """One call's live recognition."""

    async def send(self, ulaw: bytes) -> None:
        """Feed caller audio (8 kHz µ-law, any length)."""

    async def finalize(self) -> None:
        """Flush: turn everything heard so far into finals now (turn end)."""

    def events(self) -> AsyncIterator[SttEvent]:
        """Recognition events in order, until the stream is closed."""

    async def close(self) -> None:
        """End the stream and release the connection."""


class SttProvider(Protocol):
    """Opens recognition streams."""

    name: str

    async def open(self, *, language: str = "en-US",
                   endpointing_ms: int | None = None) -> SttStream:
        """Start recognising a new stream of 8 kHz µ-law audio.

        ``endpointing_ms``: the silence after which a recogniser that ends utterances itself
        should say so (``speech_final``); None leaves the provider's own setting. Recognisers
        segmented by media's VAD ignore it.
        """


class TtsChunk(msgspec.Struct, frozen=True):
    """Synthesised audio (8 kHz µ-law) with the words it covers when the provider knows them."""

    audio: bytes
    words: list[WordTiming] = msgspec.field(default_factory=list)
    clause: int = 0  # which say() this audio belongs to, counting from 0 in the stream


class TtsStream(Protocol):
    """One agent turn's speech: clauses in, audio out, in order."""

    async def say(self, text: str, *, last: bool = False) -> None:
        """Queue a clause; ``last`` closes the turn's text."""

    def audio(self) -> AsyncIterator[TtsChunk]:
        """Audio chunks in order; ends after the last clause is synthesised or on cancel."""

    async def cancel(self) -> None:
        """Stop synthesising (barge-in); ``audio`` ends promptly."""


class TtsProvider(Protocol):
    """Opens synthesis streams."""

    name: str

    async def open(self, *, voice: str = "", language: str = "en-US") -> TtsStream:
        """Start a turn's synthesis."""
