"""Knowledge: documents an org uploads, extracted, chunked, stored and retrieved per turn.

``ingest`` turns a TXT/MD/PDF/DOCX/HTML file into chunks in Postgres (org-wide or for one agent)
and emits ``knowledge.ingested`` through the configuration outbox; ``retrieve`` finds the chunks
that answer a caller's question with full-text search, fused with vector similarity when an
:class:`Embedder` is configured and pgvector is installed.
"""

from .chunking import TextChunk, chunk_text
from .embedding import Embedder, HashingEmbedderForTests
from .extract import ExtractionError, extract_text
from .store import (
    Chunk,
    IngestResult,
    KnowledgeDocument,
    KnowledgeError,
    has_vector_support,
    ingest,
    list_documents,
    retrieve,
)

__all__ = [
    "Chunk", "Embedder", "ExtractionError", "HashingEmbedderForTests", "IngestResult",
    "KnowledgeDocument", "KnowledgeError", "TextChunk", "chunk_text", "extract_text",
    "has_vector_support", "ingest", "list_documents", "retrieve",
]
