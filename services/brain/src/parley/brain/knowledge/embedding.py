"""Embedding providers for knowledge: the protocol, and a hashing stand-in for tests.

A real provider (an embeddings API, a local model) implements :class:`Embedder`. Its ``model``
attribute, when present, is stored with each vector so vectors of different models are never
compared.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Embedder", "HashingEmbedderForTests", "embedder_model"]


class Embedder(Protocol):
    """Turns texts into vectors whose cosine similarity reflects relatedness."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, all of the same dimension."""
        ...


def embedder_model(embedder: Embedder) -> str:
    """The name a provider's vectors are stored under (its ``model``, else its class)."""
    model = getattr(embedder, "model", None)
    return str(model) if model else f"{type(embedder).__module__}.{type(embedder).__qualname__}"


_WORD = re.compile(r"\w+")


class HashingEmbedderForTests:
    """NOT a semantic model: bag of words hashed into ``dimensions`` buckets, L2-normalised.

    Deterministic and dependency-free, so tests can exercise the vector path and rank fusion.
    Texts sharing exact (lower-cased) words get similar vectors; synonyms do not.
    """

    def __init__(self, dimensions: int = 64) -> None:
        self.dimensions = dimensions
        self.model = f"hashing-for-tests-{dimensions}"

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One hashed bag-of-words vector per text."""
        return [self._vector(text) for text in texts]

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dimensions
        for word in _WORD.findall(text.lower()):
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "big") % self.dimensions
            vector[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm else vector
