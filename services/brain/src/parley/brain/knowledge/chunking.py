"""Cutting text into overlapping chunks small enough to put in a prompt.

A chunk is at most ``size`` characters and ends at the best boundary in its second half: a
paragraph break, else a sentence end, else a space, so a word is never cut (only a single word
longer than ``size`` makes a longer chunk). The next chunk starts about ``overlap`` characters
before the previous one ended, at the start of a word, so a fact straddling a cut is whole in
one of the two chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_SIZE", "TextChunk", "chunk_text"]

DEFAULT_SIZE = 500
DEFAULT_OVERLAP = 80

_PARAGRAPH_END = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?=\s)")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One chunk of a source: its text and where it is (``start:end`` in the source text)."""

    source: str
    ordinal: int
    text: str
    start: int
    end: int


def chunk_text(source: str, text: str, *, size: int = DEFAULT_SIZE,
               overlap: int = DEFAULT_OVERLAP) -> list[TextChunk]:
    """Chunks of ``text`` in order, numbered from 0, each tagged with ``source``."""
    if size < 20 or not 0 <= overlap < size // 2:
        raise ValueError(f"need size >= 20 and 0 <= overlap < size/2 (got {size}, {overlap})")
    chunks: list[TextChunk] = []
    start = _skip_space(text, 0)
    while start < len(text):
        end = _cut(text, start, size)
        body = text[start:end].rstrip()
        chunks.append(TextChunk(source, len(chunks), body, start, start + len(body)))
        following = _next_start(text, end, overlap)
        # A last word longer than the overlap leaves nothing to repeat: start after it.
        start = following if following > start else _skip_space(text, end)
        if end >= len(text):
            break
    return chunks


def _cut(text: str, start: int, size: int) -> int:
    """Where the chunk starting at ``start`` ends (exclusive)."""
    limit = start + size
    if limit >= len(text):
        return len(text)
    window = text[start:limit + 1]  # +1: a boundary right after the last character counts
    floor = size // 2
    for pattern in (_PARAGRAPH_END, _SENTENCE_END):
        ends = [m.end() for m in pattern.finditer(window) if floor <= m.end() <= size]
        if ends:
            return start + ends[-1]
    spaces = [m.start() for m in _SPACE.finditer(window) if 0 < m.start() <= size]
    if spaces:
        return start + spaces[-1]
    # One word longer than a chunk: keep it whole.
    following = _SPACE.search(text, limit)
    return following.start() if following else len(text)


def _next_start(text: str, end: int, overlap: int) -> int:
    """The start of the first word at or after ``end - overlap``."""
    position = max(end - overlap, 0)
    if position > 0 and not text[position - 1].isspace():
        following = _SPACE.search(text, position)
        position = following.end() if following else len(text)
    return _skip_space(text, position)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
