"""normalize_words: what media and the brain both compare a turn's words with."""

from __future__ import annotations

import pytest

from parley.common.words import normalize_words


@pytest.mark.parametrize(("text", "words"), [
    ("Hi, how much is a  cleaning?", "hi how much is a cleaning"),
    ("I'd like one.\n", "i'd like one"),
    ("नमस्ते, आप कैसे हैं?", "नमस्ते आप कैसे हैं"),  # vowel signs and viramas inside words
    ("สวัสดี ครับ", "สวัสดี ครับ"),  # Thai vowel and tone marks
    ("Привет, мир", "привет мир"),
])
def test_words_keep_their_combining_marks(text: str, words: str) -> None:
    assert normalize_words(text) == words


def test_composed_and_decomposed_accents_are_the_same_words() -> None:
    composed, decomposed = "Un café, s'il vous plaît", "Un cafe\u0301, s'il vous plai\u0302t"
    assert normalize_words(decomposed) == normalize_words(composed) == "un café s'il vous plaît"
