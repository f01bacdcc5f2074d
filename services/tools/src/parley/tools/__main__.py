"""``python -m parley.tools``: tool dispatch to customer APIs, with human approval.

Applies migrations, then runs :class:`parley.tools.worker.ToolsService` — the work-queue
consumers on tool.requested / tool.approved / tool.denied, the approval-deadline sweep and the
approval API on ``PARLEY_TOOLS_HTTP_HOST:PARLEY_TOOLS_HTTP_PORT`` — until SIGTERM/SIGINT.
``lookup_knowledge`` asks the brain over core NATS (:func:`knowledge_over_nats`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from parley.common.service import ServiceContext, serve
from parley.common.store import apply_migrations

from .builtins import KnowledgeLookup, KnowledgeQuery
from .config import ToolsConfig
from .outcomes import ToolError
from .worker import ToolsService

# The brain's knowledge search (parley.brain.knowledge_rpc): request {org_id, agent_id, query,
# k} → reply {chunks: [{id, text, source, score}], error?}; one brain of the queue group answers.
KNOWLEDGE_SUBJECT = "parley.rpc.knowledge.search"
KNOWLEDGE_TIMEOUT_S = 3.0
KNOWLEDGE_K = 4


class _KnowledgeReply(msgspec.Struct):
    chunks: list[dict[str, Any]] = msgspec.field(default_factory=list)
    error: str = ""


_knowledge_reply = msgspec.json.Decoder(_KnowledgeReply)


def knowledge_over_nats(nc: NATS, *, timeout_s: float = KNOWLEDGE_TIMEOUT_S,
                        k: int = KNOWLEDGE_K) -> KnowledgeLookup:
    """A ``lookup_knowledge`` backend that asks the brain; failures become ToolErrors."""

    async def lookup(query: KnowledgeQuery) -> Any:
        body = msgspec.json.encode({"org_id": query.org_id, "agent_id": query.agent_id,
                                    "query": query.query, "k": k})
        try:
            msg = await nc.request(KNOWLEDGE_SUBJECT, body, timeout=timeout_s)
        except NoRespondersError:
            raise ToolError("knowledge lookup unavailable: no brain instance is answering "
                            "knowledge searches", retryable=True) from None
        except (NatsTimeoutError, TimeoutError):
            raise ToolError(f"knowledge lookup timed out: the brain did not answer within "
                            f"{timeout_s:g} s", retryable=True) from None
        try:
            reply = _knowledge_reply.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise ToolError(f"knowledge lookup got an unreadable reply: {exc}") from None
        if reply.error:
            raise ToolError(f"knowledge lookup failed: {reply.error}", retryable=True)
        return {"chunks": reply.chunks}

    return lookup


async def work(ctx: ServiceContext[ToolsConfig], stop: asyncio.Event) -> None:
    """Run the tools service until stopped."""
    await apply_migrations(ctx.config.database_url)
    service = ToolsService(ctx.config, ctx.bus, metrics=ctx.metrics,
                           knowledge=knowledge_over_nats(ctx.bus.nc))
    await service.start()
    ctx.settle()
    ctx.ready_checks.append(service.ready)
    try:
        await stop.wait()
    finally:
        await service.stop()


if __name__ == "__main__":
    raise SystemExit(serve("tools", ToolsConfig, work))
