"""µ-law codec: bit-exact against the G.711 reference (Sun's g711.c, as audioop ran it)."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parley.media.audio.codec import (
    PCM16_TO_ULAW,
    ULAW_TO_PCM16,
    pcm16_array_to_ulaw,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
    ulaw_to_pcm16_array,
)

# -- the reference, transcribed line by line from g711.c (ulaw2linear / linear2ulaw) ------------

BIAS = 0x84
CLIP = 8159
SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def reference_decode(code: int) -> int:
    u_val = ~code & 0xFF
    t = ((u_val & 0x0F) << 3) + BIAS
    t <<= (u_val & 0x70) >> 4
    return BIAS - t if u_val & 0x80 else t - BIAS


def reference_encode(sample: int) -> int:
    pcm_val = sample >> 2  # 16-bit in, the reference works on 14 bits (arithmetic shift)
    if pcm_val < 0:
        pcm_val = -pcm_val
        mask = 0x7F
    else:
        mask = 0xFF
    pcm_val = min(pcm_val, CLIP) + (BIAS >> 2)
    seg = next((i for i, end in enumerate(SEG_UEND) if pcm_val <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm_val >> (seg + 1)) & 0x0F)) ^ mask


def _audioop():
    """The stdlib implementation where it still exists (Python < 3.13), else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:
            return None
    return audioop


# -- decoding ---------------------------------------------------------------------------------


def test_decode_table_matches_the_reference_for_all_256_codes():
    assert [int(v) for v in ULAW_TO_PCM16] == [reference_decode(c) for c in range(256)]


def test_decode_known_values():
    assert ULAW_TO_PCM16[0xFF] == 0 and ULAW_TO_PCM16[0x7F] == 0  # the two zeros
    assert ULAW_TO_PCM16[0x80] == 32124 and ULAW_TO_PCM16[0x00] == -32124  # the extremes
    assert ULAW_TO_PCM16[0xFE] == 8 and ULAW_TO_PCM16[0x7E] == -8  # the smallest steps
    # sign symmetry: code c and c ^ 0x80 are each other's negatives
    assert all(ULAW_TO_PCM16[c] == -ULAW_TO_PCM16[c ^ 0x80] for c in range(256))


def test_decode_bytes_is_little_endian_pcm16():
    codes = bytes(range(256))
    pcm = ulaw_to_pcm16(codes)
    assert len(pcm) == 512
    assert list(np.frombuffer(pcm, dtype="<i2")) == [reference_decode(c) for c in range(256)]
    assert ulaw_to_pcm16_array(codes).dtype == np.dtype("<i2")
    assert ulaw_to_pcm16(b"") == b""


def test_decode_matches_audioop():
    audioop = _audioop()
    if audioop is None:
        pytest.skip("audioop is gone (Python >= 3.13); the transcribed reference still runs")
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)


# -- encoding ---------------------------------------------------------------------------------


def test_encode_table_matches_the_reference_for_every_16_bit_sample():
    samples = range(-32768, 32768)
    expected = np.array([reference_encode(s) for s in samples], dtype=np.uint8)
    got = PCM16_TO_ULAW[np.arange(-32768, 32768, dtype=np.int16).view(np.uint16)]
    assert np.array_equal(got, expected)


def test_encode_matches_audioop_for_every_16_bit_sample():
    audioop = _audioop()
    if audioop is None:
        pytest.skip("audioop is gone (Python >= 3.13); the transcribed reference still runs")
    pcm = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert pcm16_to_ulaw(pcm) == audioop.lin2ulaw(pcm, 2)


def test_encode_known_values():
    # -1 is -1 after the 14-bit shift (arithmetic), so it lands on -8, not on "-0" (0x7F)
    assert pcm16_to_ulaw(np.array([0, 3, -1, 32767, -32768], dtype="<i2").tobytes()) == bytes(
        [0xFF, 0xFF, 0x7E, 0x80, 0x00])


def test_encode_rejects_an_odd_byte_count():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_ulaw(b"\x00\x01\x02")


def test_array_and_bytes_encoders_agree():
    samples = np.array([-32768, -5000, -1, 0, 1, 123, 5000, 32767], dtype=np.int16)
    assert pcm16_array_to_ulaw(samples) == pcm16_to_ulaw(samples.astype("<i2").tobytes())


# -- round trips ------------------------------------------------------------------------------


def test_every_code_round_trips_except_negative_zero():
    """decode then encode returns the code, except 0x7F ("-0"), which comes back as 0xFF (+0).

    Both codes decode to 0, and the encoder maps 0 to the positive zero, as G.711 does.
    """
    codes = bytes(range(256))
    back = pcm16_to_ulaw(ulaw_to_pcm16(codes))
    changed = {code: back[code] for code in range(256) if back[code] != code}
    assert changed == {0x7F: 0xFF}


def test_decoded_values_are_fixed_points_of_encode_then_decode():
    values = ULAW_TO_PCM16.astype("<i2")
    assert np.array_equal(ulaw_to_pcm16_array(pcm16_array_to_ulaw(values)), values)


@given(st.binary(max_size=2048).filter(lambda b: len(b) % 2 == 0))
def test_requantising_is_idempotent_and_close(pcm):
    """Encoding a sample picks a code whose value is near it; re-encoding that value is stable."""
    once = pcm16_to_ulaw(pcm)
    decoded = ulaw_to_pcm16(once)
    assert pcm16_to_ulaw(decoded) == once
    original = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    error = np.abs(np.frombuffer(decoded, dtype="<i2").astype(np.int32) - original)
    # quantisation step grows with magnitude: ≤ 1/16 of the value + a small floor (clips at top)
    bound = np.maximum(np.minimum(np.abs(original), 32124) // 16, 8) + np.maximum(
        np.abs(original) - 32124, 0)
    assert np.all(error <= bound + 4)


@given(st.binary(max_size=1024))
def test_decode_then_encode_only_changes_negative_zero(ulaw):
    back = pcm16_to_ulaw(ulaw_to_pcm16(ulaw))
    assert back == ulaw.replace(b"\x7f", b"\xff")
