"""Cut a byte stream arriving in arbitrary chunks into exact fixed-size frames."""

from __future__ import annotations

ULAW_FRAME_BYTES = 160
"""20 ms of 8 kHz µ-law: the telephony frame."""


class FrameAligner:
    """Turns arbitrary-length chunks into whole ``frame_bytes`` frames, carrying the remainder.

    ``push`` returns the complete frames the new bytes finish, in order; bytes that do not yet
    fill a frame wait in :attr:`pending` for the next push. ``flush`` hands back what is left
    (optionally padded to a full frame) and empties the aligner.
    """

    def __init__(self, frame_bytes: int = ULAW_FRAME_BYTES) -> None:
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
        self.frame_bytes = frame_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes waiting for the rest of their frame."""
        return len(self._buffer)

    def push(self, chunk: bytes | bytearray | memoryview) -> list[bytes]:
        """Add a chunk; return every frame completed by it."""
        size = self.frame_bytes
        if not self._buffer and len(chunk) == size:  # the common case: one whole frame
            return [bytes(chunk)]
        if not self._buffer and len(chunk) % size == 0:  # already aligned
            data = bytes(chunk)
            return [data[i : i + size] for i in range(0, len(data), size)]
        self._buffer += chunk
        whole = len(self._buffer) - len(self._buffer) % size
        frames = [bytes(self._buffer[i : i + size]) for i in range(0, whole, size)]
        del self._buffer[:whole]
        return frames

    def flush(self, *, pad: bytes | None = None) -> bytes:
        r"""Return and clear the remainder; with ``pad`` (one byte) fill it to a whole frame.

        A padded flush of an empty aligner returns ``b""``: there is no partial frame to finish.
        For µ-law, pad with ``b"\xff"`` (digital silence).
        """
        rest = bytes(self._buffer)
        self._buffer.clear()
        if pad is not None and rest:
            if len(pad) != 1:
                raise ValueError("pad must be a single byte")
            rest += pad * (self.frame_bytes - len(rest))
        return rest
