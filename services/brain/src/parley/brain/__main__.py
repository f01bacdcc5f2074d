"""``python -m parley.brain``: answers callers' turns (fold, retrieval, LLM, clauses)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from parley.brain.agents import AgentLookups
from parley.brain.api import create_app
from parley.brain.config import BrainConfig
from parley.brain.knowledge import retrieve
from parley.brain.knowledge_rpc import KnowledgeResponder, search_in
from parley.brain.llm.anthropic_llm import AnthropicLlm
from parley.brain.llm.base import LlmProvider
from parley.brain.llm.local_responder import LocalResponder
from parley.brain.llm.openai_compat import OpenAICompatLlm
from parley.brain.llm.router import LlmRouter
from parley.brain.worker import BrainServices, BrainWorker
from parley.common.service import ServiceContext, serve

log = logging.getLogger("parley.brain")


def build_router(config: BrainConfig) -> LlmRouter:
    """The configured providers in fallback order, the local responder last."""
    providers: list[LlmProvider] = []
    for name in config.chain():
        if name == "anthropic":
            providers.append(AnthropicLlm(api_key=config.key("anthropic"),
                                          model=config.anthropic_model,
                                          base_url=config.anthropic_url or None))
        elif name == "openai":
            providers.append(OpenAICompatLlm(base_url=config.openai_url,
                                             model=config.openai_model,
                                             api_key=config.key("openai") or None))
        elif name == "local":
            providers.append(LocalResponder())
        else:
            raise ValueError(f"unknown LLM provider {name!r} in PARLEY_LLM_CHAIN")
    return LlmRouter(providers, filler_after_ms=config.filler_after_ms,
                     filler_text=config.filler_text, turn_deadline_s=config.turn_deadline_s)


async def run(ctx: ServiceContext[BrainConfig], stop: asyncio.Event) -> None:
    """Answer turns until stopped."""
    config = ctx.config
    router = build_router(config)
    latency = ctx.metrics.histogram("brain_prepare_ms", "Turn preparation (retrieval, profile)",
                                    ["kind"], buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 250))
    speculations = ctx.metrics.counter(
        "brain_preemptive", "Speculative replies by outcome (adopted, discarded, superseded, "
        "caller spoke, call ended, unclaimed, expired, stopped)", ["outcome"])
    # Autocommit: the brain's reads are single statements, and a transaction around each would
    # add a BEGIN and a COMMIT round trip to every lookup (writes use conn.transaction()).
    async with AsyncConnectionPool(config.database_url, min_size=2, max_size=8,
                                   kwargs={"autocommit": True}, open=False) as pool:
        lookups = AgentLookups(pool, keep_s=config.agent_cache_s)

        async def knowledge(org_id: str, agent_id: str, query: str) -> list[Any]:
            return await retrieve(pool, org_id, agent_id or None, query, k=config.knowledge_k)

        async def profile(org_id: str, call_id: str, number: str) -> str:
            async with pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT count(*), max(requested_at) FROM calls WHERE org_id = %s "
                    "AND from_number = %s AND call_id <> %s", (org_id, number, call_id))
                count, last = await cursor.fetchone() or (0, None)
            if not count:
                return ""
            return f"has called {count} time(s) before, last on {last:%Y-%m-%d}."

        worker = BrainWorker(BrainServices(
            bus=ctx.bus, router=router, agents=lookups.settings, tools=lookups.tools,
            retrieve=knowledge,
            profile=profile, instance=config.instance_id or "brain",
            turn_deadline_s=config.turn_deadline_s, turn_concurrency=config.turn_concurrency,
            preemptive=config.preemptive_generation,
            preemptive_partial_stable_s=config.preemptive_partial_stable_ms / 1000,
            preemptive_timeout_s=config.preemptive_timeout_s,
            prepare_replies=config.prepare_replies, tool_filler=config.filler_text,
            tool_filler_after_ms=config.tool_filler_after_ms,
            on_turn=lambda kind, ms: latency.labels(kind).observe(ms),
            on_speculation=lambda outcome: speculations.labels(outcome).inc()))
        responder = KnowledgeResponder(ctx.bus.nc, search_in(pool),
                                       default_k=config.knowledge_k)
        runner = web.AppRunner(create_app(pool=pool,
                                          max_upload_bytes=config.knowledge_max_upload_bytes),
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.brain_http_host, config.brain_http_port).start()
            await responder.start()
            await worker.start()
            ctx.settle()
            log.info("brain ready: LLM chain %s; knowledge API on http://%s:%d",
                     ",".join(p.name for p in router.providers), config.brain_http_host,
                     runner.addresses[0][1])
            await stop.wait()
        finally:
            await worker.stop()
            await responder.stop()
            await runner.cleanup()
            for provider in router.providers:  # their HTTP clients (kept-alive connections)
                close = getattr(provider, "aclose", None)
                if close is not None:
                    await close()


if __name__ == "__main__":
    raise SystemExit(serve("brain", BrainConfig, run))
