import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from parley.brain.knowledge import (
    ExtractionError,
    HashingEmbedderForTests,
    KnowledgeError,
    has_vector_support,
    ingest,
    list_documents,
    retrieve,
)
from parley.common import configuration as cfg
from parley.common import events as ev

PRICES = b"""# Prices

Teeth cleaning costs $95. Whitening is $200 per session, and a filling starts at $150.

We accept all major dental insurance plans.
"""
HOURS = b"""Opening hours

The clinic is open Monday to Friday from 9am to 5pm and closed on weekends and public holidays.
"""
PARKING = b"Parking is free in the garage behind the building; take the ramp on Elm Street."


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as connection:
        await cfg.create_org(connection, "acme", "Acme Dental")
        await cfg.create_agent(connection, "acme", "Reception", agent_id="rx")
        await cfg.create_agent(connection, "acme", "Billing", agent_id="billing")
        await cfg.create_org(connection, "globex", "Globex")
        await cfg.create_agent(connection, "globex", "Front desk", agent_id="gx")
        yield connection


async def outbox(conn: psycopg.AsyncConnection[Any]) -> list[ev.Event]:
    cursor = await conn.execute("SELECT payload FROM outbox ORDER BY id")
    return [ev.decode(bytes(row[0])) for row in await cursor.fetchall()]


async def test_a_price_question_finds_the_price_chunk(conn: psycopg.AsyncConnection[Any]) -> None:
    await ingest(conn, "acme", None, "prices.md", PRICES)
    await ingest(conn, "acme", None, "hours.txt", HOURS)
    await ingest(conn, "acme", None, "parking.txt", PARKING)

    found = await retrieve(conn, "acme", "rx", "how much is a cleaning?")
    assert found and found[0].source == "prices.md"
    assert "Teeth cleaning costs $95" in found[0].text
    assert 0 < found[0].score <= 1

    hours = await retrieve(conn, "acme", "rx", "When are you open on Friday?", k=1)
    assert [c.source for c in hours] == ["hours.txt"]


async def test_irrelevant_questions_find_nothing_or_score_low(
        conn: psycopg.AsyncConnection[Any]) -> None:
    await ingest(conn, "acme", None, "prices.md", PRICES)
    await ingest(conn, "acme", None, "hours.txt", HOURS)
    assert await retrieve(conn, "acme", "rx", "what's the weather like in Paris?") == []
    assert await retrieve(conn, "acme", "rx", "is it a or the?") == []  # stop words only
    assert await retrieve(conn, "acme", "rx", "") == []
    relevant = await retrieve(conn, "acme", "rx", "teeth cleaning price")
    # One shared word out of four scores well below a question the chunk answers.
    weak = await retrieve(conn, "acme", "rx", "do you sell cars, boats or public transport?")
    assert weak and weak[0].source == "hours.txt"
    assert weak[0].score < 0.2 < relevant[0].score


async def test_orgs_never_see_each_others_chunks(conn: psycopg.AsyncConnection[Any]) -> None:
    await ingest(conn, "acme", None, "prices.md", PRICES)
    await ingest(conn, "acme", "rx", "parking.txt", PARKING)
    assert await retrieve(conn, "globex", "gx", "how much is a cleaning?") == []
    assert await retrieve(conn, "globex", "rx", "parking garage") == []  # right agent, wrong org
    assert await retrieve(conn, "globex", None, "cleaning") == []
    assert await list_documents(conn, "globex", "gx") == []


async def test_agent_chunks_are_private_and_org_wide_chunks_shared(
        conn: psycopg.AsyncConnection[Any]) -> None:
    await ingest(conn, "acme", None, "prices.md", PRICES)
    await ingest(conn, "acme", "rx", "parking.txt", PARKING)

    assert [c.source for c in await retrieve(conn, "acme", "rx", "where do I park?")] == [
        "parking.txt"]
    assert await retrieve(conn, "acme", "billing", "where do I park?") == []
    assert await retrieve(conn, "acme", None, "where do I park?") == []
    assert [c.source for c in await retrieve(conn, "acme", "billing", "cleaning cost")] == [
        "prices.md"]
    listed = await list_documents(conn, "acme", "rx")
    assert [(d.source, d.agent_id) for d in listed] == [("prices.md", None),
                                                         ("parking.txt", "rx")]
    assert [d.source for d in await list_documents(conn, "acme", "billing")] == ["prices.md"]


async def test_reingesting_a_source_replaces_its_chunks_in_that_scope_only(
        conn: psycopg.AsyncConnection[Any]) -> None:
    first = await ingest(conn, "acme", None, "prices.md", PRICES)
    agent_copy = await ingest(conn, "acme", "rx", "prices.md", PRICES)
    assert not first.replaced and agent_copy.document_id != first.document_id

    again = await ingest(conn, "acme", None, "prices.md", b"Teeth cleaning now costs $105.")
    assert again.replaced and again.document_id == first.document_id and again.chunks == 1
    found = await retrieve(conn, "acme", "billing", "cleaning", k=10)
    assert [c.text for c in found] == ["Teeth cleaning now costs $105."]
    cursor = await conn.execute(
        "SELECT count(*) FROM knowledge_chunks WHERE document_id = %s", (first.document_id,))
    assert await cursor.fetchone() == (1,)
    cursor = await conn.execute("SELECT chunk_count FROM knowledge_documents ORDER BY 1")
    assert await cursor.fetchall() == [(1,), (agent_copy.chunks,)]


class CountingEmbedder(HashingEmbedderForTests):
    def __init__(self, dimensions: int = 64) -> None:
        super().__init__(dimensions)
        self.texts = 0

    async def embed(self, texts: Any) -> list[list[float]]:
        self.texts += len(texts)
        return await super().embed(texts)


async def test_reingesting_the_same_content_changes_nothing(
        conn: psycopg.AsyncConnection[Any]) -> None:
    # A nightly job syncing a docs folder adds every file again: an unchanged one was embedded
    # again (a paid API, per text), its chunks rewritten and knowledge.ingested emitted again.
    embedder = CountingEmbedder()
    first = await ingest(conn, "acme", None, "prices.md", PRICES, embedder=embedder)
    embedded, events = embedder.texts, len(await outbox(conn))
    cursor = await conn.execute("SELECT chunk_id FROM knowledge_chunks ORDER BY ordinal")
    chunk_ids = await cursor.fetchall()

    again = await ingest(conn, "acme", None, "prices.md", PRICES, embedder=embedder)
    assert (again.unchanged, again.replaced) == (True, False)
    assert (again.document_id, again.chunks) == (first.document_id, first.chunks)
    assert embedder.texts == embedded and len(await outbox(conn)) == events
    cursor = await conn.execute("SELECT chunk_id FROM knowledge_chunks ORDER BY ordinal")
    assert await cursor.fetchall() == chunk_ids

    # the same bytes to be embedded by another model, or not at all, are stored anew
    other = await ingest(conn, "acme", None, "prices.md", PRICES,
                         embedder=CountingEmbedder(dimensions=32))
    assert (other.unchanged, other.replaced) == (False, True)
    plain = await ingest(conn, "acme", None, "prices.md", PRICES)
    assert (plain.unchanged, plain.replaced) == (False, True)
    assert (await ingest(conn, "acme", None, "prices.md", PRICES)).unchanged
    # and chunked another way
    assert not (await ingest(conn, "acme", None, "prices.md", PRICES, size=40, overlap=5)).unchanged


async def test_ingest_emits_knowledge_ingested_in_the_same_transaction(
        conn: psycopg.AsyncConnection[Any]) -> None:
    result = await ingest(conn, "acme", "rx", "prices.md", PRICES, actor="cli")
    await ingest(conn, "acme", None, "hours.txt", HOURS)
    events = [e for e in await outbox(conn) if isinstance(e, ev.KnowledgeIngested)]
    assert [(e.org_id, e.agent_id, e.document_id, e.source, e.chunks, e.actor)
            for e in events][0] == ("acme", "rx", result.document_id, "prices.md",
                                    result.chunks, "cli")
    assert events[1].agent_id == "_org" and events[1].source == "hours.txt"

    # A failure after the chunks are written rolls back chunks and event together.
    before = len(await outbox(conn))
    with pytest.raises(KnowledgeError, match="not found in org"):
        await ingest(conn, "acme", "gx", "parking.txt", PARKING)
    assert len(await outbox(conn)) == before
    cursor = await conn.execute("SELECT count(*) FROM knowledge_documents")
    assert await cursor.fetchone() == (2,)


async def test_ingest_reads_files_and_reports_bad_ones(
        conn: psycopg.AsyncConnection[Any], tmp_path: Path) -> None:
    path = tmp_path / "hours.txt"
    path.write_bytes(HOURS)
    result = await ingest(conn, "acme", "rx", path)
    assert result.source == "hours.txt" and result.chunks == 1
    with pytest.raises(ExtractionError, match="cannot read file"):
        await ingest(conn, "acme", "rx", tmp_path / "missing.txt")
    with pytest.raises(ExtractionError, match="unsupported file type"):
        await ingest(conn, "acme", "rx", "deck.pptx", b"x")
    with pytest.raises(KnowledgeError, match="org 'nope' does not exist"):
        await ingest(conn, "nope", None, "hours.txt", HOURS)


async def test_long_documents_are_chunked_and_the_right_chunk_found(
        conn: psycopg.AsyncConnection[Any]) -> None:
    filler = " ".join(f"Paragraph {n} is about general dentistry topics and more." for n in
                      range(60))
    document = (filler + "\n\nEmergency appointments are available within two hours.\n\n"
                + filler).encode()
    result = await ingest(conn, "acme", None, "handbook.txt", document)
    assert result.chunks > 8
    found = await retrieve(conn, "acme", "rx", "Do you take emergency appointments?", k=2)
    assert "Emergency appointments are available" in found[0].text


async def test_works_with_a_connection_pool(database_url: str,
                                            conn: psycopg.AsyncConnection[Any]) -> None:
    async with AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False) as pool:
        await ingest(pool, "acme", None, "prices.md", PRICES)
        found = await retrieve(pool, "acme", "rx", "cleaning")
    assert found[0].source == "prices.md"


async def test_embeddings_are_fused_with_full_text(conn: psycopg.AsyncConnection[Any]) -> None:
    assert await has_vector_support(conn)  # pgserver ships pgvector; production may not
    embedder = HashingEmbedderForTests()
    await ingest(conn, "acme", None, "prices.md", PRICES, embedder=embedder)
    await ingest(conn, "acme", None, "hours.txt", HOURS, embedder=embedder)
    await ingest(conn, "globex", None, "parking.txt", PARKING, embedder=embedder)

    found = await retrieve(conn, "acme", "rx", "how much is a cleaning?", embedder=embedder)
    assert found[0].source == "prices.md" and 0 < found[0].score <= 1
    assert all(c.source != "parking.txt" for c in found)
    # Vectors of another model are not compared with this one's.
    other = HashingEmbedderForTests(dimensions=32)
    assert [c.source for c in await retrieve(conn, "acme", "rx", "cleaning",
                                             embedder=other)] == ["prices.md"]
    cursor = await conn.execute("SELECT DISTINCT embedding_model FROM knowledge_chunks")
    assert await cursor.fetchall() == [("hashing-for-tests-64",)]


async def test_a_question_with_a_nul_character_is_searched_without_it(
        conn: psycopg.AsyncConnection[Any]) -> None:
    await ingest(conn, "acme", None, "prices.md", PRICES)
    found = await retrieve(conn, "acme", "rx", "how much is a cleaning?\x00")
    assert found and found[0].source == "prices.md"


async def test_a_large_upload_does_not_hold_up_the_calls_being_answered(
        conn: psycopg.AsyncConnection[Any]) -> None:
    # The knowledge API runs in the brain's event loop, beside the turns of live calls.
    # Chunking a document at the upload limit (20 MB) ran on that loop for most of a second,
    # and every caller waiting for an answer meanwhile heard that much more silence.
    paragraph = b"The clinic is open Monday to Friday from nine to five. " * 8
    data = b"\n\n".join([paragraph] * (20_000_000 // (len(paragraph) + 2)))
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        result = await ingest(conn, "acme", None, "handbook.txt", data)
    finally:
        ticker.cancel()
    assert result.chunks > 40_000
    assert max(gaps) < 0.3, f"the event loop stalled {max(gaps):.2f} s"
