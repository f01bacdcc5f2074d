import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.brain.knowledge import chunk_text

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz$0123456789", min_size=1, max_size=14)
PUNCTUATION = st.sampled_from(["", "", "", ",", ".", "?", "!"])
SEPARATOR = st.sampled_from([" ", " ", " ", " ", "\n", "\n\n"])
TEXT = st.lists(st.tuples(WORD, PUNCTUATION, SEPARATOR), min_size=1, max_size=400).map(
    lambda parts: "".join(w + p + s for w, p, s in parts).strip())


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_chunks_respect_size_never_cut_words_and_cover_everything(text: str) -> None:
    chunks = chunk_text("faq.txt", text, size=120, overlap=20)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.source == "faq.txt"
        assert chunk.text == text[chunk.start:chunk.end] and chunk.text == chunk.text.strip()
        assert len(chunk.text) <= 120  # words here are far shorter than a chunk
        # Boundaries fall between words: whitespace (or the text's edge) on both sides.
        assert chunk.start == 0 or text[chunk.start - 1].isspace()
        assert chunk.end == len(text) or text[chunk.end].isspace()
    # Every word of the text is in some chunk, in order, and consecutive chunks overlap or touch.
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.start < after.start <= before.end + 2
    for word in re.finditer(r"\S+", text):
        assert any(c.start <= word.start() and word.end() <= c.end for c in chunks)


def test_default_chunks_are_about_500_chars_with_about_80_overlapping() -> None:
    sentences = [f"Sentence number {n} tells you something about teeth cleaning." for n in
                 range(200)]
    chunks = chunk_text("a.txt", " ".join(sentences))
    assert len(chunks) > 10
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert 250 <= len(before.text) <= 500
        assert before.text.endswith(".")  # a sentence boundary was available, so it was used
        overlap = before.end - after.start
        assert 60 <= overlap <= 80


def test_paragraph_breaks_are_preferred_over_sentence_ends() -> None:
    first = "Opening hours are nine to five. " * 8
    text = first.strip() + "\n\n" + "Prices: a cleaning costs $95. " * 20
    chunks = chunk_text("a.txt", text, overlap=0)
    assert chunks[0].text == first.strip()


def test_a_word_longer_than_a_chunk_is_kept_whole() -> None:
    url = "https://example.com/" + "x" * 600
    chunks = chunk_text("a.txt", f"see {url} for details", size=100, overlap=10)
    assert any(url in chunk.text for chunk in chunks)
    assert all(not re.search(r"x\s|\sx", c.text) or url in c.text for c in chunks)


def test_short_and_empty_texts() -> None:
    assert [c.text for c in chunk_text("a.txt", "  Just one line.  ")] == ["Just one line."]
    assert chunk_text("a.txt", "") == []
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a.txt", "x", size=100, overlap=60)
