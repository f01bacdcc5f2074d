"""Knowledge search over core NATS request/reply, for services that cannot import the brain.

The tools service's ``lookup_knowledge`` built-in asks here. Every brain instance subscribes to
:data:`SUBJECT` in the queue group :data:`QUEUE`, so exactly one answers each request.

Request (JSON): ``{"org_id": "...", "agent_id": "...", "query": "...", "k": 4}`` — ``agent_id``
empty searches the org-wide documents only; ``k`` is clamped to 1..20 (0: the brain's default).
Reply (JSON): ``{"chunks": [{"id", "text", "source", "score"}, ...]}``, best first; a request
that cannot be answered gets ``{"chunks": [], "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .knowledge import Chunk, retrieve
from .knowledge.store import Database

log = logging.getLogger(__name__)

SUBJECT = "parley.rpc.knowledge.search"
QUEUE = "brain-knowledge"
MAX_K = 20

Search = Callable[[str, str | None, str, int], Awaitable[list[Chunk]]]
"""(org, agent or None for org-wide only, query, k) → chunks, best first."""


class SearchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller asks."""

    org_id: str
    agent_id: str = ""
    query: str
    k: int = 0


class SearchReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the brain answers."""

    chunks: list[Chunk]  # required, so it is always sent (omit_defaults drops only error)
    error: str = ""


_request = msgspec.json.Decoder(SearchRequest)
_encode = msgspec.json.Encoder().encode


class KnowledgeResponder:
    """Answers knowledge searches for this brain instance until stopped."""

    def __init__(self, nc: NATS, search: Search, *, default_k: int = 3,
                 concurrency: int = 8) -> None:
        self.nc = nc
        self._search = search
        self._default_k = default_k
        self._slots = asyncio.Semaphore(concurrency)
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Join the queue group."""
        self._sub = await self.nc.subscribe(SUBJECT, queue=QUEUE, cb=self._on_request)

    async def stop(self) -> None:
        """Leave the group, then finish the requests in hand."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time: answer in tasks so one slow
        # search does not queue the others (bounded by the semaphore).
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg), name="brain:knowledge-rpc")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("knowledge request failed", exc_info=task.exception())

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return  # a publish, not a request: nobody to answer
        reply = await self.answer(msg.data)
        await msg.respond(_encode(reply))

    async def answer(self, data: bytes) -> SearchReply:
        """The reply to one encoded request."""
        try:
            request = _request.decode(data)
        except msgspec.DecodeError as exc:
            return SearchReply(chunks=[], error=f"invalid knowledge request: {exc}")
        if not request.org_id:
            return SearchReply(chunks=[], error="invalid knowledge request: org_id is required")
        if not request.query.strip():
            return SearchReply(chunks=[])
        k = min(MAX_K, request.k) if request.k > 0 else self._default_k
        try:
            chunks = await self._search(request.org_id, request.agent_id or None,
                                        request.query, k)
        except Exception as exc:  # Postgres down, etc.: the caller reports it to the model
            log.exception("knowledge search failed for org %s", request.org_id)
            return SearchReply(chunks=[], error=f"knowledge search failed: {type(exc).__name__}")
        return SearchReply(chunks=chunks)


def search_in(db: Database) -> Search:
    """A :data:`Search` over a Postgres pool or connection (plain full-text retrieval)."""

    async def search(org_id: str, agent_id: str | None, query: str, k: int) -> list[Chunk]:
        return await retrieve(db, org_id, agent_id, query, k=k)

    return search
