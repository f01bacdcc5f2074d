"""Sample-rate conversion with soxr between the rates the media service meets.

8 kHz (telephony), 16 kHz (Whisper, Silero), 22.05 kHz (Piper voices) and 24 kHz (TTS vendors).
One-shot conversion for whole buffers, and :class:`StreamResampler` for audio that arrives in
chunks: it keeps the filter state between chunks, so chunk boundaries leave no clicks and the
output length tracks ``input × out_rate / in_rate`` (minus the filter delay until ``flush``).
Arrays are mono int16 or float32 (float in [-1, 1]); the output dtype equals the input dtype.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

SUPPORTED_RATES = (8000, 16000, 22050, 24000)
Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]
_DTYPES = (np.dtype(np.int16), np.dtype(np.float32))


def _check(in_rate: int, out_rate: int) -> None:
    for rate in (in_rate, out_rate):
        if rate not in SUPPORTED_RATES:
            raise ValueError(f"unsupported sample rate {rate}; use one of {SUPPORTED_RATES}")


def resample(samples: npt.NDArray[np.int16] | npt.NDArray[np.float32], in_rate: int,
             out_rate: int, *, quality: Quality = "HQ") -> npt.NDArray[np.int16 | np.float32]:
    """Resample a whole mono int16 or float32 buffer."""
    _check(in_rate, out_rate)
    if samples.dtype not in _DTYPES:
        raise TypeError(f"expected int16 or float32 samples, got {samples.dtype}")
    if in_rate == out_rate:
        return samples.copy()
    out: npt.NDArray[np.int16 | np.float32] = soxr.resample(samples, in_rate, out_rate,
                                                             quality=quality)
    return out


def pcm16_to_float32(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    """int16 → float32 in [-1, 1)."""
    return samples.astype(np.float32) * np.float32(1 / 32768)


def float32_to_pcm16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """float32 in [-1, 1] → int16, rounded and clipped."""
    return np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)


class StreamResampler:
    """Resamples one continuous mono stream fed in chunks of any length.

    Keep one per stream (it holds the filter history); call :meth:`flush` once at the end to get
    the samples still inside the filter.
    """

    def __init__(self, in_rate: int, out_rate: int, *,
                 dtype: Literal["int16", "float32"] = "int16", quality: Quality = "HQ") -> None:
        _check(in_rate, out_rate)
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.dtype = np.dtype(dtype)
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype=dtype, quality=quality)
        self._done = False

    def process(self, chunk: npt.NDArray[np.int16] | npt.NDArray[np.float32]
                ) -> npt.NDArray[np.int16 | np.float32]:
        """Resample the next chunk; returns what the filter can emit so far."""
        if self._done:
            raise RuntimeError("the stream was flushed; create a new StreamResampler")
        if chunk.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} samples, got {chunk.dtype}")
        out: npt.NDArray[np.int16 | np.float32] = self._stream.resample_chunk(chunk)
        return out

    def flush(self) -> npt.NDArray[np.int16 | np.float32]:
        """End the stream and return the remaining samples."""
        self._done = True
        out: npt.NDArray[np.int16 | np.float32] = self._stream.resample_chunk(
            np.zeros(0, dtype=self.dtype), last=True)
        return out
