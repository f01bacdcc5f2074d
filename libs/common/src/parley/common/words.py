"""The caller's words compared as words: case, punctuation and spacing make no difference.

Media and the brain both compare a turn's text with the words a prepared reply answers, so they
must normalise the same way.
"""

from __future__ import annotations

import unicodedata

__all__ = ["normalize_words"]


def normalize_words(text: str) -> str:
    """Lower-case words (letters, digits, apostrophes, combining marks), NFC, single-spaced.

    A combining mark is part of its word: Devanagari's vowel signs and viramas, Thai's tone
    marks, or an accent typed as its own code point ("café" as e + U+0301) must not cut a word.
    """
    return " ".join("".join(
        c if c.isalnum() or c == "'" or unicodedata.category(c)[0] == "M" else " "
        for c in unicodedata.normalize("NFC", text).lower()).split())
