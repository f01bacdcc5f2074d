"""G.711 µ-law with numpy lookup tables, WAV reading at any format, WAV writing.

No ``audioop`` (removed in Python 3.13): µ-law uses two lookup tables built once (65,536 entries
to encode, 256 to decode) and resampling uses soxr.
"""

from __future__ import annotations

import functools
import io
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 8000
ULAW_SILENCE = 0xFF  # µ-law code for a zero sample

Pcm = npt.NDArray[np.int16]

_BIAS = 0x84
_CLIP_14 = 8159
_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


@functools.cache
def _encode_table() -> npt.NDArray[np.uint8]:
    """µ-law code for every int16 value, indexed by ``value & 0xFFFF``.

    G.711 on the top 14 bits, as the CCITT reference code (and the old ``audioop``) does.
    """
    values = np.arange(65536, dtype=np.int32)
    values = np.where(values >= 32768, values - 65536, values) >> 2
    negative = values < 0
    magnitude = np.minimum(np.abs(values), _CLIP_14) + (_BIAS >> 2)
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude, side="left")
    code = np.where(segment > 7, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    return (code ^ np.where(negative, 0x7F, 0xFF)).astype(np.uint8)


@functools.cache
def _decode_table() -> Pcm:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    magnitude = (((codes & 0x0F) << 3) + _BIAS) << exponent
    return np.where(codes & 0x80, _BIAS - magnitude, magnitude - _BIAS).astype(np.int16)


def ulaw_encode(samples: Pcm) -> bytes:
    """16-bit PCM samples → µ-law bytes."""
    return _encode_table()[samples.astype(np.int16).view(np.uint16)].tobytes()


def ulaw_decode(data: bytes) -> Pcm:
    """µ-law bytes → 16-bit PCM samples."""
    return _decode_table()[np.frombuffer(data, dtype=np.uint8)]


def pcm_to_ulaw_8k(samples: npt.NDArray[np.floating] | Pcm, rate: int) -> bytes:
    """Mono PCM at any rate (int16, or float in [-1, 1]) → 8 kHz µ-law, resampled with soxr."""
    import soxr

    if samples.dtype.kind == "f":
        floats = np.asarray(samples, dtype=np.float32)
    else:
        floats = samples.astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        floats = soxr.resample(floats, rate, SAMPLE_RATE)
    pcm = np.clip(np.round(floats * 32768.0), -32768, 32767).astype(np.int16)
    return ulaw_encode(pcm)


def read_wav_as_ulaw(path: str | Path) -> bytes:
    """A PCM WAV file of any rate, width (8/16/24/32-bit) and channel count → 8 kHz mono µ-law."""
    with wave.open(str(path), "rb") as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width == 1:  # 8-bit WAV is unsigned
        floats = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        widened = np.zeros((len(bytes3), 4), dtype=np.uint8)
        widened[:, 1:] = bytes3  # little endian: the 24 bits become the top of an int32
        floats = widened.view("<i4").reshape(-1).astype(np.float32) / 2.0**31
    elif width in (2, 4):
        ints = np.frombuffer(raw, dtype=f"<i{width}")
        floats = ints.astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    mono = floats.reshape(-1, channels).mean(axis=1) if channels > 1 else floats
    return pcm_to_ulaw_8k(mono, rate)


def wav_bytes(channels: Sequence[Pcm], rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit WAV file holding the given channels (padded with silence to the longest)."""
    length = max((len(channel) for channel in channels), default=0)
    frames = np.zeros((length, max(len(channels), 1)), dtype="<i2")
    for index, channel in enumerate(channels):
        frames[: len(channel), index] = channel
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames.tobytes())
    return buffer.getvalue()


def place_segments(segments: Sequence[tuple[float, bytes]], length: int = 0) -> Pcm:
    """Decode µ-law segments and place each at its start time (seconds) on one 8 kHz track."""
    ends = [round(start * SAMPLE_RATE) + len(audio) for start, audio in segments]
    track = np.zeros(max([length, *ends]), dtype=np.int16)
    for (_, audio), end in zip(segments, ends, strict=True):
        track[end - len(audio) : end] = ulaw_decode(audio)
    return track


def mix_down(channels: Sequence[Pcm]) -> Pcm:
    """Sum channels into one, clipped to 16 bits."""
    length = max((len(channel) for channel in channels), default=0)
    total = np.zeros(length, dtype=np.int32)
    for channel in channels:
        total[: len(channel)] += channel
    return np.clip(total, -32768, 32767).astype(np.int16)
