"""Plain text out of uploaded documents: TXT, Markdown, PDF, DOCX and HTML.

Every extractor returns text whose paragraphs are separated by a blank line, so the chunker can
prefer paragraph boundaries whatever the format was. Anything that cannot give text raises an
:class:`ExtractionError` naming the file and the reason — whatever a parser raised on it, so a
document no parser can read is refused as such, never an internal error. Encrypted PDFs that
open without a password (an owner password restricting only copying or printing, as brochures
often have) are read: AES needs pypdf's ``crypto`` extra (``cryptography``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import PurePath

__all__ = ["CONTENT_TYPES", "ExtractionError", "content_type", "extract_text"]


class ExtractionError(ValueError):
    """A document that gives no text: unsupported type, corrupt file or nothing to read."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


CONTENT_TYPES = {
    ".txt": "text/plain", ".text": "text/plain",
    ".md": "text/markdown", ".markdown": "text/markdown",
    ".pdf": "application/pdf",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".html": "text/html", ".htm": "text/html",
}


def content_type(source: str) -> str:
    """The media type of a source name by its extension; raise if it is not supported."""
    suffix = PurePath(source).suffix.lower()
    try:
        return CONTENT_TYPES[suffix]
    except KeyError:
        supported = ", ".join(sorted(CONTENT_TYPES))
        raise ExtractionError(
            source, f"unsupported file type {suffix or '(no extension)'!r}; "
                    f"supported: {supported}") from None


def extract_text(source: str, data: bytes) -> str:
    """The text of a document named ``source`` (its extension picks the format)."""
    kind = content_type(source)
    try:
        text = _normalise(_EXTRACTORS[kind](source, data))
    except ExtractionError:
        raise
    except Exception as exc:  # a parser's failure on a document it was not ready for
        raise ExtractionError(source, f"unreadable {kind} document "
                                      f"({type(exc).__name__}: {exc})") from exc
    if not text:
        raise ExtractionError(source, "no text in the document (empty, or only images/markup)")
    return text


def _decode(source: str, data: bytes) -> str:
    if b"\x00" in data:
        raise ExtractionError(source, "binary content where text was expected")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
                              ) from exc


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_PREFIX = re.compile(r"^[ \t]{0,3}(?:#{1,6}[ \t]+|>[ \t]?|[-*+][ \t]+(?=\S)|\d+[.)][ \t]+)",
                        re.MULTILINE)
_MD_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.MULTILINE)
_MD_EMPHASIS = re.compile(r"(\*\*|__|\*|`)(?=\S)(.+?)(?<=\S)\1")


def _markdown(source: str, data: bytes) -> str:
    # Light touch: drop the markup a reader would not say aloud; keep every word.
    text = _decode(source, data)
    text = _MD_FENCE.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_PREFIX.sub("", text)
    return _MD_EMPHASIS.sub(r"\2", text)


def _pdf(source: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError(source, "the PDF is password-protected")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ExtractionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise ExtractionError(source, f"corrupt or unreadable PDF ({exc})") from exc
    return "\n\n".join(pages)


def _docx(source: str, data: bytes) -> str:
    import docx
    from docx.table import _Cell

    try:
        document = docx.Document(io.BytesIO(data))
        blocks = [paragraph.text for paragraph in document.paragraphs]
        for table in document.tables:
            # Each cell once (``row.cells`` repeats a merged cell in every column it spans),
            # and a row a vertical merge continues into repeats the merged text, so each row
            # reads on its own (``row.cells`` fails on a merge continued in the first row).
            above: dict[int, str] = {}  # grid column → the text of the cell there
            for row in table.rows:
                column, cells = row._tr.grid_before, []
                for tc in row._tr.tc_lst:
                    text = _Cell(tc, table).text.strip()
                    if tc.vMerge == "continue":
                        text = above.get(column, text)
                    above[column] = text
                    cells.append(text)
                    column += tc.grid_span
                blocks.append(" | ".join(cells))
    except Exception as exc:  # BadZipFile, KeyError, python-docx's PackageNotFoundError, …
        raise ExtractionError(source, f"corrupt or unreadable DOCX ({exc})") from exc
    return "\n\n".join(blocks)


class _HtmlText(HTMLParser):
    """Collects visible text; block elements become paragraph breaks."""

    SKIP = frozenset({"script", "style", "noscript", "template", "svg"})
    BLOCKS = frozenset({
        "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
        "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td",
        "th", "tr", "ul", "title",
    })

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping.append(tag)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skipping and tag == self.skipping[-1]:
            self.skipping.pop()
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(re.sub(r"\s+", " ", data))


def _html(source: str, data: bytes) -> str:
    parser = _HtmlText()
    parser.feed(_decode(source, data))
    parser.close()
    return "".join(parser.parts)


_EXTRACTORS: dict[str, Callable[[str, bytes], str]] = {
    "text/plain": _decode,
    "text/markdown": _markdown,
    "application/pdf": _pdf,
    CONTENT_TYPES[".docx"]: _docx,
    "text/html": _html,
}


def _normalise(text: str) -> str:
    """Spaces collapsed, lines trimmed, paragraphs separated by exactly one blank line.

    NULs go (a PDF's unmapped glyphs extract as U+0000, which Postgres text cannot hold).
    """
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\xa0", " ")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in block.split("\n")]
        joined = "\n".join(line for line in lines if line)
        if joined:
            paragraphs.append(joined)
    return "\n\n".join(paragraphs)
