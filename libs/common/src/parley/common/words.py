"""The caller's words compared as words: case, punctuation and spacing make no difference.

Media and the brain both compare a turn's text with the words a prepared reply answers, so they
must normalise the same way.
"""

from __future__ import annotations

__all__ = ["normalize_words"]


def normalize_words(text: str) -> str:
    """Lower-case words (letters, digits, apostrophes) separated by single spaces."""
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split())
