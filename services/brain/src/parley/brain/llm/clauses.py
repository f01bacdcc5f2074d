"""Cut a streamed reply into clauses that TTS can start speaking before the reply is finished.

A clause ends at a sentence end (``.`` ``!`` ``?``, possibly followed by closing quotes or
brackets) followed by whitespace, or at ``,`` ``;`` ``:`` followed by whitespace once the clause
has at least ``min_words`` words — short fragments ("Well,") would sound choppy. Punctuation
followed by a non-space never ends a clause, which keeps ``$4.50``, ``10:30`` and ``1,000``
whole; a period after a title (``Dr.``, ``Mr.``), after a Latin abbreviation (``e.g.``,
``i.e.``, ``vs.``), or after a single capital (an initial, ``J. Smith``) does not end a sentence
either; ``etc.``, ``a.m.``, ``p.m.``, degrees (``Ph.D.``) and units (``ft.``, ``lbs.``,
``min.``) end one only when a capitalised word follows.

Because a decision may need the next character (is ``$4.`` followed by ``50``?), text at the
end of the buffer waits for more; :meth:`ClauseSplitter.flush` returns whatever is left.
"""

from __future__ import annotations

__all__ = ["ClauseSplitter", "split_sentences"]

_SENTENCE_ENDS = frozenset(".!?")
_SOFT_ENDS = frozenset(",;:")
_CLOSERS = frozenset("\"')]}\u201d\u2019")
# Never end a sentence: titles and abbreviations that are followed by more of the sentence.
_NEVER_FINAL = frozenset({
    "dr", "mr", "mrs", "ms", "prof", "st", "mt", "jr", "sr", "sgt", "capt", "gen", "rev", "fr",
    "e.g", "i.e", "vs", "cf", "approx", "appt", "apt", "dept", "est", "fig", "tel", "ext",
})
# End a sentence only when a capitalised word follows ("at 9 a.m. Then…" vs "9 a.m. tomorrow").
_MAYBE_FINAL = frozenset({"etc", "a.m", "p.m", "am", "pm", "inc", "ltd", "co", "u.s", "no", "jan",
                          "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
                          "dec", "ph.d", "m.d", "d.d.s", "ft", "in", "lb", "lbs", "oz", "min",
                          "mins", "hr", "hrs", "sec", "secs"})


class ClauseSplitter:
    """Feed text deltas, get back each clause as soon as it is complete.

    ``min_words`` is the shortest clause that ``,;:`` may end (``None``: split at sentence ends
    only). Clauses are returned stripped; whitespace between them is dropped.
    """

    def __init__(self, *, min_words: int | None = 4) -> None:
        self.min_words = min_words
        self._buffer = ""
        self._scan = 0  # every boundary before this index has been decided

    def feed(self, delta: str) -> list[str]:
        """Add ``delta`` and return the clauses it completed (often none, sometimes several)."""
        self._buffer += delta
        clauses: list[str] = []
        while (end := self._next_boundary()) is not None:
            clause = self._buffer[:end].strip()
            self._buffer = self._buffer[end:].lstrip()
            self._scan = 0
            if clause:
                clauses.append(clause)
        return clauses

    def flush(self) -> str:
        """The text not yet returned (stripped; "" if none), and reset for the next reply."""
        rest = self._buffer.strip()
        self._buffer = ""
        self._scan = 0
        return rest

    def _next_boundary(self) -> int | None:
        """The index just after the next clause end in the buffer, or ``None`` if undecided."""
        text = self._buffer
        i = self._scan
        while i < len(text):
            char = text[i]
            if char not in _SENTENCE_ENDS and char not in _SOFT_ENDS:
                i += 1
                continue
            end = i + 1
            while end < len(text) and (text[end] in _SENTENCE_ENDS or text[end] in _CLOSERS):
                end += 1
            if end >= len(text):
                self._scan = i  # wait: the next character decides
                return None
            if not text[end].isspace():
                i = end  # "$4.50", "10:30", "1,000", "…?!x"
                continue
            if char in _SOFT_ENDS:
                if self.min_words is not None and len(text[:i].split()) >= self.min_words:
                    return end
                i = end
                continue
            decision = self._sentence_ends(text, i, end)
            if decision is None:
                self._scan = i
                return None
            if decision:
                return end
            i = end
        self._scan = i
        return None

    @staticmethod
    def _sentence_ends(text: str, mark: int, end: int) -> bool | None:
        """Whether the punctuation at ``mark`` ends a sentence (``None``: need more text)."""
        if text[mark] != ".":
            return True
        word = text[:mark].rsplit(None, 1)[-1] if text[:mark].strip() else ""
        word = word.lstrip("(\"'\u201c").lower()
        if word in _NEVER_FINAL:
            return False
        if len(word) == 1 and word.isalpha() and text[mark - 1].isupper():
            return False  # an initial: "J. Smith"
        if word in _MAYBE_FINAL:
            rest = text[end:].lstrip()
            if not rest:
                return None
            return rest[0].isupper()
        return True


def split_sentences(text: str) -> list[str]:
    """Split finished ``text`` into sentences with the same rules as :class:`ClauseSplitter`."""
    splitter = ClauseSplitter(min_words=None)
    sentences = splitter.feed(text)
    rest = splitter.flush()
    return [*sentences, rest] if rest else sentences
