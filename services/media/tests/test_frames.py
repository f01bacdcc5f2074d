"""FrameAligner: arbitrary chunks in, exact frames out, nothing lost or reordered."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parley.media.audio.frames import ULAW_FRAME_BYTES, FrameAligner


def test_aligned_chunks_pass_straight_through():
    aligner = FrameAligner()
    data = bytes(range(256)) * 2
    frames = aligner.push(data[:320])
    assert frames == [data[:160], data[160:320]]
    assert aligner.pending == 0


def test_short_chunks_wait_for_the_rest_of_their_frame():
    aligner = FrameAligner(4)
    assert aligner.push(b"ab") == []
    assert aligner.pending == 2
    assert aligner.push(b"cdefghij") == [b"abcd", b"efgh"]
    assert aligner.pending == 2
    assert aligner.push(memoryview(b"kl")) == [b"ijkl"]
    assert aligner.pending == 0


def test_a_multiple_of_the_frame_after_a_remainder_is_not_taken_as_aligned():
    aligner = FrameAligner(4)
    aligner.push(b"x")
    assert aligner.push(b"abcd") == [b"xabc"]
    assert aligner.pending == 1


def test_empty_push_and_flush():
    aligner = FrameAligner()
    assert aligner.push(b"") == []
    assert aligner.flush() == b""
    assert aligner.flush(pad=b"\xff") == b""  # nothing to finish


def test_flush_returns_the_remainder_padded_or_not():
    aligner = FrameAligner(4)
    aligner.push(b"abcdef")
    assert aligner.flush() == b"ef"
    assert aligner.pending == 0
    aligner.push(b"z")
    assert aligner.flush(pad=b"\xff") == b"z\xff\xff\xff"
    assert aligner.pending == 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        FrameAligner(0)
    aligner = FrameAligner(4)
    aligner.push(b"a")
    with pytest.raises(ValueError, match="single byte"):
        aligner.flush(pad=b"ab")


def test_default_frame_is_20_ms_of_8_khz_ulaw():
    assert ULAW_FRAME_BYTES == 160 == FrameAligner().frame_bytes


@given(st.lists(st.binary(max_size=500), max_size=30), st.integers(1, 200))
def test_any_chunking_yields_the_same_frames(chunks, size):
    aligner = FrameAligner(size)
    frames = [frame for chunk in chunks for frame in aligner.push(chunk)]
    data = b"".join(chunks)
    whole = len(data) - len(data) % size
    assert all(len(frame) == size for frame in frames)
    assert b"".join(frames) == data[:whole]
    assert aligner.pending == len(data) - whole
    assert aligner.flush() == data[whole:]
