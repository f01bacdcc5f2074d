"""Knowledge search over NATS: the brain's responder, and the tools service's lookup through it.

Real nats-server and Postgres. The last tests drive the tools service's ``lookup_knowledge``
built-in with the lookup its ``__main__`` injects, against a responder running in this process
(a cross-service test: the two services share only the wire format).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from parley.brain.knowledge import ingest
from parley.brain.knowledge_rpc import SUBJECT, KnowledgeResponder, search_in
from parley.common import configuration as cfg
from parley.tools.__main__ import knowledge_over_nats
from parley.tools.builtins import Builtins, KnowledgeQuery
from parley.tools.call_context import CallContext
from parley.tools.outcomes import ToolError

ORG, AGENT, FOREIGN_ORG = "acme", "rx", "globex"
PRICES = b"# Prices\n\nTeeth cleaning costs $95. Whitening is $200 per session.\n"
HOURS = b"The clinic is open Monday to Friday from 9am to 5pm.\n"
SECRET = b"Globex cleaning costs $5 for staff only.\n"


@pytest.fixture
async def pool(database_url: str) -> Any:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await cfg.create_org(conn, ORG, "Acme Dental")
        await cfg.create_agent(conn, ORG, "Reception", agent_id=AGENT)
        await cfg.create_org(conn, FOREIGN_ORG, "Globex")
        await ingest(conn, ORG, AGENT, "prices.md", PRICES)
        await ingest(conn, ORG, None, "hours.txt", HOURS)
        await ingest(conn, FOREIGN_ORG, None, "secret.txt", SECRET)
    async with AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False) as opened:
        yield opened


@pytest.fixture
async def responder(bus: Any, pool: Any) -> Any:
    running = KnowledgeResponder(bus.nc, search_in(pool), default_k=3)
    await running.start()
    yield running
    await running.stop()


async def ask(bus: Any, **request: Any) -> dict[str, Any]:
    reply = await bus.nc.request(SUBJECT, msgspec.json.encode(request), timeout=5.0)
    result: dict[str, Any] = msgspec.json.decode(reply.data)
    return result


async def test_the_responder_answers_with_the_agents_chunks(bus: Any, responder: Any) -> None:
    found = await ask(bus, org_id=ORG, agent_id=AGENT, query="how much is a cleaning?", k=2)
    assert "error" not in found
    best = found["chunks"][0]
    assert set(best) == {"id", "text", "source", "score"}
    assert best["source"] == "prices.md" and "$95" in best["text"]
    assert all(c["source"] != "secret.txt" for c in found["chunks"])

    # No agent: the org-wide documents only.
    org_wide = await ask(bus, org_id=ORG, agent_id="", query="cleaning price opening hours")
    assert [c["source"] for c in org_wide["chunks"]] == ["hours.txt"]
    assert (await ask(bus, org_id=ORG, agent_id=AGENT, query="   "))["chunks"] == []


async def test_bad_requests_get_an_error_not_silence(bus: Any, responder: Any) -> None:
    reply = await bus.nc.request(SUBJECT, b"not json", timeout=5.0)
    assert msgspec.json.decode(reply.data)["error"].startswith("invalid knowledge request")
    missing = await ask(bus, org_id="", agent_id=AGENT, query="cleaning")
    assert missing == {"chunks": [], "error": "invalid knowledge request: org_id is required"}


async def test_one_instance_of_the_queue_group_answers(bus: Any, pool: Any) -> None:
    calls: list[str] = []

    def counting(name: str) -> Any:
        search = search_in(pool)

        async def counted(org: str, agent: str | None, query: str, k: int) -> Any:
            calls.append(name)
            return await search(org, agent, query, k)

        return counted

    first = KnowledgeResponder(bus.nc, counting("first"))
    second = KnowledgeResponder(bus.nc, counting("second"))
    await first.start()
    await second.start()
    try:
        replies = await asyncio.gather(*(
            ask(bus, org_id=ORG, agent_id=AGENT, query="cleaning") for _ in range(20)))
    finally:
        await first.stop()
        await second.stop()
    assert len(calls) == 20 and all(r["chunks"] for r in replies)


# ------------------------------------------------------------------ the tools service's side


async def lookup_through_builtins(bus: Any, pool: Any, query: str, **options: Any) -> Any:
    builtins = Builtins(bus.nc, knowledge=knowledge_over_nats(bus.nc, **options))
    call = CallContext(org_id=ORG, call_id="call-1", agent_id=AGENT)
    async with pool.connection() as conn:
        return await builtins.run(conn, "lookup_knowledge", {"query": query}, call, "toolu_1")


async def test_lookup_knowledge_returns_an_ingested_chunk(bus: Any, pool: Any,
                                                          responder: Any) -> None:
    outcome = await lookup_through_builtins(bus, pool, "What does teeth cleaning cost?")
    assert outcome.ok, outcome.error
    best = outcome.result["chunks"][0]
    assert best["source"] == "prices.md" and "Teeth cleaning costs $95" in best["text"]


async def test_lookup_knowledge_fails_clearly_without_a_brain(bus: Any, pool: Any) -> None:
    outcome = await lookup_through_builtins(bus, pool, "cleaning")
    assert not outcome.ok and outcome.retryable
    assert outcome.error.startswith("knowledge lookup unavailable")

    async def never_answers(msg: Any) -> None:
        pass

    sub = await bus.nc.subscribe(SUBJECT, cb=never_answers)
    try:
        outcome = await lookup_through_builtins(bus, pool, "cleaning", timeout_s=0.2)
    finally:
        await sub.unsubscribe()
    assert not outcome.ok and outcome.retryable
    assert outcome.error == "knowledge lookup timed out: the brain did not answer within 0.2 s"


async def test_an_error_reply_becomes_a_tool_error(bus: Any) -> None:
    async def failing(msg: Any) -> None:
        await msg.respond(b'{"chunks": [], "error": "knowledge search failed: OperationalError"}')

    sub = await bus.nc.subscribe(SUBJECT, cb=failing)
    try:
        with pytest.raises(ToolError, match="knowledge search failed"):
            await knowledge_over_nats(bus.nc)(KnowledgeQuery(
                org_id=ORG, agent_id=AGENT, call_id="c", query="cleaning"))
    finally:
        await sub.unsubscribe()
