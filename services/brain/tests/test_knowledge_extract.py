import io
import zipfile

import docx
import pytest

from parley.brain.knowledge import ExtractionError, extract_text


def minimal_pdf(*pages: str) -> bytes:
    """A valid PDF with one line of Helvetica text per page, xref offsets computed."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    font = len(objects) + 1
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for text in pages:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode()
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        content = len(objects)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>"
                       % (font, content))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % kid for kid in kids), len(kids))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


def docx_bytes(*paragraphs: str, table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_plain_text_is_normalised_into_paragraphs() -> None:
    data = "\ufeffOpening  hours:\r\n9-5\r\n\r\n\r\n\r\nClosed   Sundays. ".encode()
    text = extract_text("faq.txt", data)
    assert text == "Opening hours:\n9-5\n\nClosed Sundays."


def test_markdown_markup_is_dropped_but_every_word_kept() -> None:
    source = b"# Prices\n\n- **Teeth cleaning** costs $95\n- See [our site](https://x.example)\n"
    assert extract_text("prices.md", source) == "Prices\n\nTeeth cleaning costs $95\nSee our site"


def test_pdf_text_of_every_page() -> None:
    text = extract_text("menu.pdf", minimal_pdf("Teeth cleaning costs $95", "Whitening (gel) $200"))
    assert text == "Teeth cleaning costs $95\n\nWhitening (gel) $200"


def test_docx_paragraphs_and_tables() -> None:
    data = docx_bytes("Opening hours", "Monday to Friday, 9 to 5.",
                      table=[["Cleaning", "$95"], ["Filling", "$150"]])
    assert extract_text("Hours.DOCX", data) == (
        "Opening hours\n\nMonday to Friday, 9 to 5.\n\nCleaning | $95\n\nFilling | $150")


def test_html_drops_scripts_and_styles_and_keeps_blocks() -> None:
    page = b"""<!doctype html><html><head><title>Clinic</title><style>p {color: red}</style>
    <script>var price = "$1";</script></head><body><nav>Home</nav>
    <h1>Prices</h1><p>Teeth <b>cleaning</b> costs&nbsp;$95.<br>Walk-ins welcome.</p>
    <ul><li>Whitening</li><li>Fillings</li></ul><noscript>Enable JS</noscript></body></html>"""
    assert extract_text("index.html", page) == (
        "Clinic\n\nHome\n\nPrices\n\nTeeth cleaning costs $95.\n\nWalk-ins welcome.\n\n"
        "Whitening\n\nFillings")


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("slides.pptx", b"whatever", "unsupported file type '.pptx'"),
    ("README", b"text", "unsupported file type '(no extension)'"),
    ("broken.pdf", b"%PDF-1.4\nthis is not a pdf", "corrupt or unreadable PDF"),
    ("broken.docx", b"PK\x03\x04 not a zip", "corrupt or unreadable DOCX"),
    ("latin1.txt", "café".encode("latin-1"), "not UTF-8 text"),
    ("binary.txt", b"abc\x00def", "binary content"),
    ("blank.md", b"  \n\n  \n", "no text in the document"),
    ("scripts-only.html", b"<script>x()</script><style>p{}</style>", "no text in the document"),
])
def test_unreadable_documents_raise_a_typed_error_naming_the_file(
        name: str, data: bytes, reason: str) -> None:
    with pytest.raises(ExtractionError) as raised:
        extract_text(name, data)
    assert raised.value.source == name
    assert reason in str(raised.value) and str(raised.value).startswith(f"{name}: ")


def test_a_zip_that_is_not_a_docx_is_corrupt() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(ExtractionError, match="corrupt or unreadable DOCX"):
        extract_text("fake.docx", out.getvalue())


def test_an_empty_pdf_page_has_no_text() -> None:
    with pytest.raises(ExtractionError, match="no text"):
        extract_text("scan.pdf", minimal_pdf(""))


def encrypted_pdf(text: str, *, algorithm: str, user_password: str = "") -> bytes:
    """``minimal_pdf(text)`` encrypted with pypdf, an owner password restricting it."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(minimal_pdf(text))))
    writer.encrypt(user_password=user_password, owner_password="owner-secret",
                   algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize("algorithm", ["AES-128", "AES-256", "RC4-128"])
def test_a_pdf_that_opens_without_a_password_is_read(algorithm: str) -> None:
    # Brochures and statements often come so: anyone may read, only copying is restricted.
    data = encrypted_pdf("Teeth cleaning costs $95", algorithm=algorithm)
    assert extract_text("brochure.pdf", data) == "Teeth cleaning costs $95"


def test_a_pdf_that_needs_a_password_is_refused_as_such() -> None:
    data = encrypted_pdf("Teeth cleaning costs $95", algorithm="AES-256", user_password="x")
    with pytest.raises(ExtractionError, match="password-protected"):
        extract_text("private.pdf", data)


def test_whatever_a_parser_raises_on_a_document_is_an_extraction_error() -> None:
    # Encrypted for certificate holders (Adobe's public-key handler): pypdf raises
    # NotImplementedError, which is no parse error of its own.
    data = minimal_pdf("Teeth cleaning costs $95").replace(
        b"/Root 1 0 R >>", b"/Root 1 0 R /Encrypt << /Filter /Adobe.PubSec /V 4 >> "
                           b"/ID [<0102> <0102>] >>")
    with pytest.raises(ExtractionError) as raised:
        extract_text("certified.pdf", data)
    assert str(raised.value).startswith("certified.pdf: unreadable application/pdf document")


def test_nul_characters_are_dropped() -> None:
    # A PDF's glyph with no Unicode mapping extracts as U+0000; Postgres text cannot hold it.
    text = extract_text("prices.pdf", minimal_pdf("Teeth cleaning costs $95 \x00 per visit"))
    assert text == "Teeth cleaning costs $95 per visit"


def test_docx_merged_cells_are_read_once_and_every_row_stands_alone() -> None:
    document = docx.Document()
    grid = document.add_table(rows=3, cols=3)
    grid.cell(0, 0).merge(grid.cell(0, 2)).text = "Cleaning prices"  # one cell, 3 columns
    grid.cell(1, 0).merge(grid.cell(2, 0)).text = "Cleaning"  # one cell, 2 rows
    for row, (price, who) in enumerate([("$95", "adults"), ("$60", "children")], 1):
        grid.cell(row, 1).text, grid.cell(row, 2).text = price, who
    out = io.BytesIO()
    document.save(out)
    assert extract_text("prices.docx", out.getvalue()) == (
        "Cleaning prices\n\nCleaning | $95 | adults\n\nCleaning | $60 | children")


def test_docx_a_vertical_merge_continued_in_a_first_row_is_read() -> None:
    # Word marks a cell continuing the merge above with <w:vMerge/>; some writers put one in a
    # table's first row, where there is nothing above to continue.
    from docx.oxml import OxmlElement

    document = docx.Document()
    grid = document.add_table(rows=1, cols=2)
    grid.cell(0, 0).text, grid.cell(0, 1).text = "Cleaning", "$95"
    grid.rows[0]._tr.tc_lst[0].get_or_add_tcPr().append(OxmlElement("w:vMerge"))
    out = io.BytesIO()
    document.save(out)
    assert extract_text("prices.docx", out.getvalue()) == "Cleaning | $95"
