"""Resampling between 8, 16, 22.05 and 24 kHz: lengths, frequency, streaming = one-shot."""

import itertools

import numpy as np
import pytest

from parley.media.audio.resample import (
    SUPPORTED_RATES,
    StreamResampler,
    float32_to_pcm16,
    pcm16_to_float32,
    resample,
)

PAIRS = list(itertools.permutations(SUPPORTED_RATES, 2))


def sine(frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5):
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    window = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(window))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
@pytest.mark.parametrize("frequency", [440.0, 1000.0, 3000.0])
def test_length_and_frequency_survive(in_rate, out_rate, frequency):
    signal = sine(frequency, in_rate)
    out = resample(signal, in_rate, out_rate)
    assert out.dtype == np.float32
    assert len(out) == round(len(signal) * out_rate / in_rate)
    # 1 s of audio: FFT bins are 1 Hz apart
    assert abs(dominant_frequency(out, out_rate) - frequency) <= 2
    # the level survives too (skip the filter's edges)
    middle = out[len(out) // 10 : -len(out) // 10]
    assert np.sqrt(np.mean(middle.astype(np.float64) ** 2)) == pytest.approx(0.5 / np.sqrt(2),
                                                                           rel=0.02)


def test_downsampling_removes_what_the_lower_rate_cannot_carry():
    tone = sine(6000, 16000)  # above 8 kHz's Nyquist (4 kHz): must be filtered, not aliased
    out = resample(tone, 16000, 8000)
    assert np.max(np.abs(out[400:-400])) < 0.01


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (16000, 8000),
                                                   (22050, 8000), (24000, 8000)])
def test_int16_in_int16_out(in_rate, out_rate):
    signal = float32_to_pcm16(sine(1000, in_rate))
    out = resample(signal, in_rate, out_rate)
    assert out.dtype == np.int16
    assert len(out) == round(len(signal) * out_rate / in_rate)
    assert abs(dominant_frequency(out, out_rate) - 1000) <= 2


def test_same_rate_is_a_copy():
    signal = sine(1000, 8000)
    out = resample(signal, 8000, 8000)
    assert np.array_equal(out, signal) and out is not signal


def test_unsupported_rates_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="unsupported sample rate"):
        resample(sine(100, 8000), 8000, 44100)
    with pytest.raises(ValueError, match="unsupported sample rate"):
        StreamResampler(11025, 8000)
    with pytest.raises(TypeError):
        resample(np.zeros(10, dtype=np.float64), 8000, 16000)


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_stream_in_random_chunks_equals_one_shot(in_rate, out_rate, dtype):
    signal = sine(1000, in_rate, seconds=0.5) + sine(250, in_rate, seconds=0.5, amplitude=0.3)
    if dtype == "int16":
        signal = float32_to_pcm16(signal)
    stream = StreamResampler(in_rate, out_rate, dtype=dtype)
    rng = np.random.default_rng(in_rate + out_rate)
    pieces, position = [], 0
    while position < len(signal):
        size = int(rng.integers(1, 700))
        pieces.append(stream.process(signal[position : position + size]))
        position += size
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    one_shot = resample(signal, in_rate, out_rate)
    assert streamed.dtype == np.dtype(dtype)
    assert len(streamed) == len(one_shot)
    # int16 output is rounded (and may be dithered) per call: a few LSB of 32768
    tolerance = 4 if dtype == "int16" else 1e-4
    assert np.max(np.abs(streamed.astype(np.float64) - one_shot.astype(np.float64))) <= tolerance


def test_stream_in_20_ms_frames_keeps_pace():
    stream = StreamResampler(8000, 16000)
    frame = float32_to_pcm16(sine(1000, 8000, seconds=0.02))
    produced = sum(len(stream.process(frame)) for _ in range(50))
    produced += len(stream.flush())
    assert produced == 16000


def test_stream_refuses_wrong_dtype_and_use_after_flush():
    stream = StreamResampler(8000, 16000, dtype="float32")
    with pytest.raises(TypeError):
        stream.process(np.zeros(160, dtype=np.int16))
    stream.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        stream.process(np.zeros(160, dtype=np.float32))


def test_pcm16_float32_conversions():
    pcm = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
    floats = pcm16_to_float32(pcm)
    assert floats.dtype == np.float32
    assert floats[0] == -1.0 and floats[2] == 0.0 and floats[-1] < 1.0
    back = float32_to_pcm16(floats)
    assert np.max(np.abs(back.astype(int) - pcm.astype(int))) <= 1
    assert list(float32_to_pcm16(np.array([1.5, -1.5], dtype=np.float32))) == [32767, -32768]
