"""Audio plumbing for the hot path: µ-law codec, resampling, frame alignment."""

from parley.media.audio.codec import (
    PCM16_TO_ULAW,
    ULAW_TO_PCM16,
    pcm16_array_to_ulaw,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
    ulaw_to_pcm16_array,
)
from parley.media.audio.frames import ULAW_FRAME_BYTES, FrameAligner
from parley.media.audio.resample import (
    SUPPORTED_RATES,
    StreamResampler,
    float32_to_pcm16,
    pcm16_to_float32,
    resample,
)

__all__ = [
    "PCM16_TO_ULAW",
    "SUPPORTED_RATES",
    "ULAW_FRAME_BYTES",
    "ULAW_TO_PCM16",
    "FrameAligner",
    "StreamResampler",
    "float32_to_pcm16",
    "pcm16_array_to_ulaw",
    "pcm16_to_float32",
    "pcm16_to_ulaw",
    "resample",
    "ulaw_to_pcm16",
    "ulaw_to_pcm16_array",
]
