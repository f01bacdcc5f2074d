"""Retrieval latency over a realistic amount of knowledge (budget: p50 ≤ 10 ms at 10,000 chunks).

:func:`bench_retrieval` fills a fresh, migrated database through :func:`ingest` with synthetic
documents — words drawn from a Zipf-like distribution, so common words match thousands of chunks
as in real text — then times :func:`retrieve` (k=4, one connection, round trip included) for
caller-like questions. Wrapped by ``bench/run.py``; runnable alone::

    python -m parley.brain.knowledge.bench <database_url>
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from parley.common import configuration as cfg

from .store import ingest, retrieve

__all__ = ["RetrievalBench", "bench_retrieval"]

_SYLLABLES = ["ka", "lo", "mi", "ter", "san", "dor", "vel", "pra", "qui", "nes", "tum", "rox"]
_DOMAIN = ["cleaning", "whitening", "filling", "crown", "insurance", "appointment", "parking",
           "hours", "emergency", "implant", "braces", "invoice", "refund", "x-ray", "hygienist"]
_STOP = ["how", "much", "is", "a", "the", "do", "you", "what", "when", "can", "I", "for", "my"]


@dataclass
class RetrievalBench:
    """What :func:`bench_retrieval` measured: per-query latencies in ns and the set-up."""

    samples_ns: list[int]
    chunks: int
    documents: int
    ingest_seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0..100) latency in milliseconds (nearest rank)."""
        ordered = sorted(self.samples_ns)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index] / 1e6

    def summary(self) -> str:
        """One line for a log."""
        return (f"{len(self.samples_ns)} queries over {self.chunks:,} chunks: "
                f"p50 {self.percentile_ms(50):.2f} ms, p99 {self.percentile_ms(99):.2f} ms, "
                f"mean {statistics.fmean(self.samples_ns) / 1e6:.2f} ms")


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words = set(_DOMAIN)
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered


def _document(rng: random.Random, vocabulary: list[str], weights: list[float],
              sentences: int) -> str:
    paragraphs, paragraph = [], []
    for _ in range(sentences):
        words = rng.choices(vocabulary, weights, k=rng.randint(6, 16))
        paragraph.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
        if rng.random() < 0.2:
            paragraphs.append(" ".join(paragraph))
            paragraph = []
    paragraphs.append(" ".join(paragraph))
    return "\n\n".join(p for p in paragraphs if p)


def _question(rng: random.Random, vocabulary: list[str], weights: list[float]) -> str:
    words = rng.sample(_STOP, 3) + rng.choices(vocabulary, weights, k=rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words) + "?"


async def bench_retrieval(database_url: str, *, chunks: int = 10_000, queries: int = 500,
                          warmup: int = 50, seed: int = 1,
                          log: Any = None) -> RetrievalBench:
    """Fill ``database_url`` (fresh and migrated) with ``chunks`` chunks and time retrieval.

    Half the documents are org-wide and half belong to the queried agent; another org holds a
    tenth as many chunks that must never be returned. Returns the raw samples.
    """
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng, 5_000)
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf, s = 1
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for org, agent in (("bench", "bench-agent"), ("other", "other-agent")):
            await cfg.create_org(conn, org, org)
            await cfg.create_agent(conn, org, agent, agent_id=agent)
        started = time.perf_counter()
        stored = documents = 0
        while stored < chunks:
            text = _document(rng, vocabulary, weights, sentences=rng.randint(40, 120))
            agent_id = "bench-agent" if documents % 2 else None
            result = await ingest(conn, "bench", agent_id, f"doc-{documents}.txt", text.encode())
            stored += result.chunks
            documents += 1
        for n in range(max(1, documents // 10)):
            await ingest(conn, "other", None, f"other-{n}.txt",
                         _document(rng, vocabulary, weights, sentences=80).encode())
        ingest_seconds = time.perf_counter() - started
        await conn.execute("ANALYZE knowledge_chunks")
        if log:
            log(f"  ingested {stored:,} chunks in {documents} documents in {ingest_seconds:.1f}s")

        questions = [_question(rng, vocabulary, weights) for _ in range(queries + warmup)]
        samples = []
        for n, question in enumerate(questions):
            began = time.perf_counter_ns()
            found = await retrieve(conn, "bench", "bench-agent", question, k=4)
            elapsed = time.perf_counter_ns() - began
            if any(not c.source.startswith("doc-") for c in found):
                raise RuntimeError(f"retrieval crossed tenants for {question!r}")
            if n >= warmup:
                samples.append(elapsed)
    return RetrievalBench(samples_ns=samples, chunks=stored, documents=documents,
                          ingest_seconds=ingest_seconds,
                          config={"chunks": stored, "documents": documents, "k": 4,
                                  "queries": queries, "warmup": warmup,
                                  "vocabulary": len(vocabulary), "search": "full-text"})


if __name__ == "__main__":
    result = asyncio.run(bench_retrieval(sys.argv[1], log=print))
    print(result.summary())
