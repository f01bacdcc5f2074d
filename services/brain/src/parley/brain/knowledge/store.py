"""Knowledge in Postgres: ingest documents as chunks, retrieve the chunks that answer a question.

Chunks are scoped to an org and either one agent or the whole org (``agent_id`` None); an agent
sees its own chunks and the org-wide ones, never another org's. Retrieval is Postgres full-text
search (``tsv`` is a generated english tsvector with a GIN index); when an :class:`Embedder` is
given and pgvector is installed, vector similarity is fused with it by reciprocal rank fusion.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parley.common import events as ev
from parley.common.configuration import emit

from .chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, TextChunk, chunk_text
from .embedding import Embedder, embedder_model
from .extract import ExtractionError, content_type, extract_text

__all__ = [
    "ORG_WIDE_EVENT_AGENT", "Chunk", "Database", "IngestResult", "KnowledgeDocument",
    "KnowledgeError", "has_vector_support", "ingest", "list_documents", "retrieve",
]

Database = AsyncConnection[Any] | AsyncConnectionPool[Any]

# knowledge.ingested is an agent event and its agent_id must be a subject token; org-wide
# documents are reported under this id (agent ids never start with "_" in practice).
ORG_WIDE_EVENT_AGENT = "_org"

_FTS_CANDIDATES = 50  # ranked by ts_rank_cd, then re-scored by term coverage
_PRESELECTED = 200  # see _FULL_TEXT_SQL
_RRF_K = 60  # the usual reciprocal rank fusion constant


class KnowledgeError(ValueError):
    """Knowledge that cannot be stored or searched: unknown org or agent, or no pgvector."""


class IngestResult(msgspec.Struct, frozen=True, kw_only=True):
    """What ingesting one source produced."""

    document_id: str
    source: str
    chunks: int
    replaced: bool = False  # the source was stored before, with other content
    unchanged: bool = False  # stored before with the same chunks (and embedding model): kept


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A retrieved chunk; ``score`` is in [0, 1], higher is more relevant."""

    id: str
    text: str
    source: str
    score: float


class KnowledgeDocument(msgspec.Struct, frozen=True, kw_only=True):
    """One ingested source as listed."""

    document_id: str
    org_id: str
    agent_id: str | None
    source: str
    content_type: str
    chars: int
    chunks: int
    updated_at: Any = None


@asynccontextmanager
async def _connection(db: Database) -> AsyncIterator[AsyncConnection[Any]]:
    if isinstance(db, AsyncConnectionPool):
        async with db.connection() as conn:
            yield conn
    else:
        yield db


async def ingest(db: Database, org_id: str, agent_id: str | None, source: str | Path,
                 data: bytes | None = None, *, embedder: Embedder | None = None,
                 actor: str = "", size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP,
                 new_id: Callable[[], str] = lambda: f"kd_{secrets.token_hex(8)}",
                 ) -> IngestResult:
    """Store a document's chunks for an org (``agent_id`` None: org-wide) or one of its agents.

    ``source`` is a file path to read, or — with ``data`` — the name the bytes are stored under.
    A source already ingested in the same scope is replaced. The chunks and the
    ``knowledge.ingested`` outbox row commit in one transaction. A source stored before with the
    same bytes, chunked the same and embedded by the same model (or neither) is left as it is
    (``unchanged``; nothing embedded, written or emitted): a job that adds a whole folder again
    every night pays only for the files that changed, and retrieval keeps its chunk ids.
    """
    if data is None:
        path = Path(source)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise ExtractionError(str(source), f"cannot read file ({exc.strerror or exc})"
                                  ) from exc
        name = path.name
    else:
        name = str(source)
    media_type = content_type(name)
    text = await asyncio.to_thread(extract_text, name, data)
    chunks = await asyncio.to_thread(chunk_text, name, text, size=size, overlap=overlap)
    digest = hashlib.sha256(data).hexdigest()
    model = None if embedder is None else embedder_model(embedder)
    async with _connection(db) as conn:
        kept = await _stored_as(conn, org_id, agent_id, name, digest, chunks, model)
    if kept is not None:
        return IngestResult(document_id=kept, source=name, chunks=len(chunks), unchanged=True)
    vectors: list[str | None] = [None] * len(chunks)
    if embedder is not None:
        vectors = [_vector_literal(v) for v in await embedder.embed([c.text for c in chunks])]
    async with _connection(db) as conn, conn.transaction():
        await _require_scope(conn, org_id, agent_id)
        if embedder is not None and not await has_vector_support(conn):
            raise KnowledgeError("embeddings need pgvector, which this database does not have")
        cursor = await conn.execute(
            "INSERT INTO knowledge_documents AS d (document_id, org_id, agent_id, source, "
            "content_type, sha256, chars, chunk_count) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (org_id, (coalesce(agent_id, '')), source) DO UPDATE SET "
            "content_type = excluded.content_type, sha256 = excluded.sha256, "
            "chars = excluded.chars, chunk_count = excluded.chunk_count, updated_at = now() "
            "RETURNING document_id, xmax <> 0",
            (new_id(), org_id, agent_id, name, media_type, digest, len(text), len(chunks)))
        row = await cursor.fetchone()
        assert row is not None
        document_id, replaced = row[0], bool(row[1])
        if replaced:
            await conn.execute("DELETE FROM knowledge_chunks WHERE document_id = %s",
                               (document_id,))
        try:
            await _insert_chunks(conn, document_id, org_id, agent_id, chunks, vectors, model)
        except psycopg.errors.ProgramLimitExceeded as exc:
            # A run without spaces is one chunk (a word is never cut): past ~1 MB of distinct
            # words (a list exported with commas) its full-text index is more than Postgres holds.
            raise ExtractionError(name, "a passage without spaces too long to index "
                                        f"({exc.diag.message_primary})") from exc
        await emit(conn, ev.KnowledgeIngested(
            org_id=org_id, agent_id=agent_id or ORG_WIDE_EVENT_AGENT, document_id=document_id,
            source=name, chunks=len(chunks), actor=actor))
    return IngestResult(document_id=document_id, source=name, chunks=len(chunks),
                        replaced=replaced)


async def _stored_as(conn: AsyncConnection[Any], org_id: str, agent_id: str | None, name: str,
                     digest: str, chunks: list[TextChunk], model: str | None) -> str | None:
    """The document already holding exactly these chunks of these bytes, if one does."""
    cursor = await conn.execute(
        "SELECT c.text, c.embedding_model, d.document_id FROM knowledge_documents d "
        "JOIN knowledge_chunks c USING (document_id) WHERE d.org_id = %s "
        "AND coalesce(d.agent_id, '') = coalesce(%s, '') AND d.source = %s AND d.sha256 = %s "
        "ORDER BY c.ordinal", (org_id, agent_id, name, digest))
    rows = await cursor.fetchall()
    if not rows or len(rows) != len(chunks):
        return None
    if any(text != chunk.text or stored_model != model
           for (text, stored_model, _), chunk in zip(rows, chunks, strict=True)):
        return None
    return str(rows[0][2])


async def _insert_chunks(conn: AsyncConnection[Any], document_id: str, org_id: str,
                         agent_id: str | None, chunks: list[TextChunk],
                         vectors: list[str | None], model: str | None) -> None:
    columns = "document_id, org_id, agent_id, source, ordinal, text"
    if model is not None:
        columns += ", embedding_model, embedding"
    async with conn.cursor() as cursor, cursor.copy(
            f"COPY knowledge_chunks ({columns}) FROM STDIN") as copy:
        for chunk, vector in zip(chunks, vectors, strict=True):
            values: tuple[Any, ...] = (document_id, org_id, agent_id, chunk.source,
                                       chunk.ordinal, chunk.text)
            if model is not None:
                values += (model if vector is not None else None, vector)
            await copy.write_row(values)


async def retrieve(db: Database, org_id: str, agent_id: str | None, query: str, k: int = 4, *,
                   embedder: Embedder | None = None, min_similarity: float = 0.2,
                   ) -> list[Chunk]:
    """The ``k`` chunks that best answer ``query``, visible to the agent (or org-wide only).

    Full text: any of the query's words may match (a caller's question rarely shares all its
    words with the answer). The best 200 matches by ``ts_rank`` are ranked by ``ts_rank_cd``
    and returned by score ``coverage * rank / (rank + 0.1)``, where coverage is the share of
    the query's words the chunk contains: near 0 means "nothing relevant" (≥ 0.2 is a
    reasonable "relevant" threshold), 1 a dense match of every word.
    A query with no searchable words returns nothing.

    With an ``embedder`` (and pgvector), the full-text and vector rankings are fused by
    reciprocal rank fusion; the score is then the fused score divided by its maximum, and
    vector candidates below ``min_similarity`` (cosine) are ignored.
    """
    if k <= 0:
        return []
    query = query.replace("\x00", "")  # Postgres text cannot hold it; no word has it
    async with _connection(db) as conn:
        lexical = await _full_text(conn, org_id, agent_id, query, max(k, _FTS_CANDIDATES))
        if embedder is None:
            return lexical[:k]
        if not await has_vector_support(conn):
            raise KnowledgeError("embeddings need pgvector, which this database does not have")
        [vector] = await embedder.embed([query])
        semantic = await _nearest(conn, org_id, agent_id, vector, embedder_model(embedder),
                                  max(k, _FTS_CANDIDATES), min_similarity)
    return _fuse([lexical, semantic], k)


# The query's lexemes OR-ed together (quote_literal keeps odd lexemes valid tsquery operands).
# ts_rank_cd costs ~4 µs a row, too much when a common word matches most of the corpus, so
# the cheaper ts_rank (~0.5 µs) picks the %(preselect)s best candidates first; ts_rank_cd and the
# coverage then order those.
_FULL_TEXT_SQL = """
WITH q AS MATERIALIZED (
    SELECT lexemes, array_to_string(
               ARRAY(SELECT quote_literal(l) FROM unnest(lexemes) AS l), ' | ')::tsquery AS tsq
    FROM (SELECT array_agg(lexeme)
          FROM unnest(tsvector_to_array(to_tsvector('english', %(query)s))) AS lexeme
         ) AS given (lexemes)
), preselected AS (
    SELECT c.chunk_id, c.text, c.source, c.tsv
    FROM knowledge_chunks c, q
    WHERE c.tsv @@ q.tsq AND c.org_id = %(org)s
      AND (c.agent_id IS NULL OR c.agent_id = %(agent)s)
    ORDER BY ts_rank(c.tsv, q.tsq) DESC, c.chunk_id
    LIMIT %(preselect)s
)
SELECT p.chunk_id, p.text, p.source, ts_rank_cd(p.tsv, q.tsq) AS rank,
       (SELECT count(*) FROM unnest(q.lexemes) AS l WHERE p.tsv @@ quote_literal(l)::tsquery)
           ::float8 / cardinality(q.lexemes) AS coverage
FROM preselected p, q
ORDER BY rank DESC, p.chunk_id
LIMIT %(candidates)s
"""


async def _full_text(conn: AsyncConnection[Any], org_id: str, agent_id: str | None, query: str,
                     candidates: int) -> list[Chunk]:
    cursor = await conn.execute(_FULL_TEXT_SQL, {
        "query": query, "org": org_id, "agent": agent_id, "candidates": candidates,
        "preselect": _PRESELECTED})
    scored = []
    for chunk_id, text, source, rank, coverage in await cursor.fetchall():
        score = coverage * rank / (rank + 0.1)
        scored.append((score, rank, Chunk(id=str(chunk_id), text=text, source=source,
                                          score=round(score, 4))))
    scored.sort(key=lambda item: (-item[0], -item[1], int(item[2].id)))
    return [chunk for _, _, chunk in scored]


async def _nearest(conn: AsyncConnection[Any], org_id: str, agent_id: str | None,
                   vector: list[float], model: str, candidates: int,
                   min_similarity: float) -> list[Chunk]:
    literal = _vector_literal(vector)
    if literal is None:
        return []
    cursor = await conn.execute(
        "SELECT chunk_id, text, source, 1 - (embedding <=> %(v)s::vector) AS similarity "
        "FROM knowledge_chunks WHERE org_id = %(org)s "
        "AND (agent_id IS NULL OR agent_id = %(agent)s) "
        "AND embedding_model = %(model)s AND vector_dims(embedding) = %(dims)s "
        "ORDER BY embedding <=> %(v)s::vector LIMIT %(candidates)s",
        {"v": literal, "org": org_id, "agent": agent_id, "model": model, "dims": len(vector),
         "candidates": candidates})
    return [Chunk(id=str(row[0]), text=row[1], source=row[2], score=round(row[3], 4))
            for row in await cursor.fetchall() if row[3] >= min_similarity]


def _fuse(rankings: list[list[Chunk]], k: int) -> list[Chunk]:
    """Reciprocal rank fusion, normalised so a chunk ranked first everywhere scores 1."""
    fused: dict[str, float] = {}
    chunks: dict[str, Chunk] = {}
    for ranking in rankings:
        for position, chunk in enumerate(ranking, 1):
            fused[chunk.id] = fused.get(chunk.id, 0.0) + 1.0 / (_RRF_K + position)
            chunks.setdefault(chunk.id, chunk)
    best = len(rankings) / (_RRF_K + 1)
    order = sorted(fused, key=lambda chunk_id: (-fused[chunk_id], int(chunk_id)))[:k]
    return [msgspec.structs.replace(chunks[chunk_id], score=round(fused[chunk_id] / best, 4))
            for chunk_id in order]


async def list_documents(db: Database, org_id: str,
                         agent_id: str | None) -> list[KnowledgeDocument]:
    """Documents the agent sees (its own and the org-wide ones), or only org-wide ones."""
    async with _connection(db) as conn:
        cursor = await conn.execute(
            "SELECT document_id, org_id, agent_id, source, content_type, chars, chunk_count, "
            "updated_at FROM knowledge_documents WHERE org_id = %s "
            "AND (agent_id IS NULL OR agent_id = %s) ORDER BY agent_id NULLS FIRST, source",
            (org_id, agent_id))
        rows = await cursor.fetchall()
    return [KnowledgeDocument(document_id=r[0], org_id=r[1], agent_id=r[2], source=r[3],
                              content_type=r[4], chars=r[5], chunks=r[6], updated_at=r[7])
            for r in rows]


async def has_vector_support(conn: AsyncConnection[Any]) -> bool:
    """Whether the chunks table has its pgvector ``embedding`` column (see 005_knowledge.sql)."""
    cursor = await conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('knowledge_chunks') "
        "AND attname = 'embedding' AND NOT attisdropped")
    return await cursor.fetchone() is not None


async def _require_scope(conn: AsyncConnection[Any], org_id: str, agent_id: str | None) -> None:
    cursor = await conn.execute("SELECT 1 FROM orgs WHERE org_id = %s", (org_id,))
    if await cursor.fetchone() is None:
        raise KnowledgeError(f"org {org_id!r} does not exist")
    if agent_id is not None:
        cursor = await conn.execute(
            "SELECT 1 FROM agents WHERE agent_id = %s AND org_id = %s AND deleted_at IS NULL",
            (agent_id, org_id))
        if await cursor.fetchone() is None:
            raise KnowledgeError(f"agent {agent_id!r} not found in org {org_id!r}")


def _vector_literal(vector: list[float]) -> str | None:
    """The text form pgvector parses; None for a zero vector, whose cosine distance is undefined."""
    if not any(vector):
        return None
    return "[" + ",".join(repr(float(v)) for v in vector) + "]"
