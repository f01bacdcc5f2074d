"""The knowledge API against a real Postgres (and NATS for the outbox relay)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg_pool import AsyncConnectionPool

from parley.brain.api import create_app
from parley.common import configuration as cfg
from parley.common import events as ev

ORG, AGENT, OTHER_AGENT = "acme", "rx", "billing"
FOREIGN_ORG, FOREIGN_AGENT = "globex", "gx"
PRICES = b"# Prices\n\nTeeth cleaning costs $95. Whitening is $200 per session.\n"
HOURS = b"The clinic is open Monday to Friday from 9am to 5pm.\n"


@pytest.fixture
async def keys(database_url: str) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await cfg.create_org(conn, ORG, "Acme Dental")
        await cfg.create_agent(conn, ORG, "Reception", agent_id=AGENT)
        await cfg.create_agent(conn, ORG, "Billing", agent_id=OTHER_AGENT)
        await cfg.create_org(conn, FOREIGN_ORG, "Globex")
        await cfg.create_agent(conn, FOREIGN_ORG, "Front desk", agent_id=FOREIGN_AGENT)
        _, acme = await cfg.create_api_key(conn, ORG)
        revoked, revoked_token = await cfg.create_api_key(conn, ORG, name="old")
        await cfg.revoke_api_key(conn, ORG, revoked.key_id)
        _, reader = await cfg.create_api_key(conn, ORG, scopes=["knowledge:read"])
        _, calls = await cfg.create_api_key(conn, ORG, scopes=["calls:read"])
        _, approver = await cfg.create_api_key(conn, ORG, scopes=["tools:approve"])
    return {"acme": acme, "revoked": revoked_token, "reader": reader, "calls": calls,
            "approver": approver}


@pytest.fixture
async def pool(database_url: str, keys: dict[str, str]) -> Any:
    async with AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False) as opened:
        yield opened


@pytest.fixture
async def client(pool: Any) -> Any:
    async with TestClient(TestServer(create_app(pool=pool, max_upload_bytes=4096))) as c:
        yield c


def url(agent: str = AGENT, suffix: str = "") -> str:
    return f"/v1/agents/{agent}/knowledge{suffix}"


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status and body["type"].startswith("https://parley.dev/problems/")
    return body


async def test_upload_list_and_search(client: Any, keys: dict[str, str], database_url: str,
                                      ) -> None:
    headers = {"X-API-Key": keys["acme"]}
    form = aiohttp.FormData()
    form.add_field("file", PRICES, filename="prices.md", content_type="text/markdown")
    response = await client.post(url(), data=form, headers=headers)
    assert response.status == 201, await response.text()
    uploaded = await response.json()
    assert uploaded["source"] == "prices.md" and uploaded["chunks"] >= 1
    assert (uploaded["agent_id"], uploaded["org_wide"], uploaded["replaced"]) == (
        AGENT, False, False)

    response = await client.post(url(), params={"source": "hours.txt", "org_wide": "true"},
                                 data=HOURS, headers=headers)
    assert response.status == 201, await response.text()
    assert (await response.json())["agent_id"] is None

    listed = await (await client.get(url(), headers=headers)).json()
    assert sorted(d["source"] for d in listed["documents"]) == ["hours.txt", "prices.md"]
    # Another agent of the org sees the org-wide document only.
    other = await (await client.get(url(OTHER_AGENT), headers=headers)).json()
    assert [d["source"] for d in other["documents"]] == ["hours.txt"]

    response = await client.get(url(suffix="/search"), params={"q": "how much is a cleaning?"},
                                headers=headers)
    found = await response.json()
    assert found["chunks"][0]["source"] == "prices.md"
    assert "$95" in found["chunks"][0]["text"] and 0 < found["chunks"][0]["score"] <= 1
    response = await client.get(url(suffix="/search"), params={"q": "when are you open", "k": 1},
                                headers=headers)
    assert [c["source"] for c in (await response.json())["chunks"]] == ["hours.txt"]

    # Uploading the same source again keeps it as it is; with other content, replaces it.
    response = await client.post(url(), params={"source": "prices.md"}, data=PRICES,
                                 headers=headers)
    again = await response.json()
    assert (response.status, again["unchanged"], again["replaced"]) == (200, True, False)
    response = await client.post(url(), params={"source": "prices.md"},
                                 data=PRICES + b"\nX-rays are free.", headers=headers)
    again = await response.json()
    assert (response.status, again["unchanged"], again["replaced"]) == (201, False, True)

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute("SELECT payload FROM outbox ORDER BY id")
        ingested = [e for e in (ev.decode(bytes(r[0])) for r in await cursor.fetchall())
                    if isinstance(e, ev.KnowledgeIngested)]
    assert [(e.source, e.agent_id) for e in ingested] == [
        ("prices.md", AGENT), ("hours.txt", "_org"), ("prices.md", AGENT)]
    assert ingested[0].actor.startswith("api_key:")


async def test_the_gateway_relay_publishes_knowledge_ingested(client: Any, keys: dict[str, str],
                                                              database_url: str, bus: Any,
                                                              ) -> None:
    seen: list[ev.Event] = []

    async def on_message(msg: Any) -> None:
        seen.append(ev.decode(msg.data))

    sub = await bus.nc.subscribe("parley.ev.>", cb=on_message)
    response = await client.post(url(), params={"source": "hours.txt"}, data=HOURS,
                                 headers={"X-API-Key": keys["acme"]})
    assert response.status == 201
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await cfg.OutboxRelay(bus, conn).publish_pending()
    for _ in range(200):
        if any(isinstance(e, ev.KnowledgeIngested) for e in seen):
            break
        await asyncio.sleep(0.01)
    await sub.unsubscribe()
    [event] = [e for e in seen if isinstance(e, ev.KnowledgeIngested)]
    assert (event.org_id, event.agent_id, event.source) == (ORG, AGENT, "hours.txt")


async def test_keys_are_required_and_checked(client: Any, keys: dict[str, str]) -> None:
    body = await problem(await client.get(url()), 401)
    assert body["type"].endswith("missing-api-key")
    for token in ("not-a-key", keys["revoked"], "pk_nope_nope"):
        body = await problem(await client.get(url(), headers={"X-API-Key": token}), 401)
        assert body["type"].endswith("invalid-api-key")


async def test_agents_of_other_orgs_do_not_exist(client: Any, keys: dict[str, str]) -> None:
    headers = {"X-API-Key": keys["acme"]}
    for agent in (FOREIGN_AGENT, "nobody"):
        await problem(await client.get(url(agent), headers=headers), 404)
        await problem(await client.get(url(agent, "/search"), params={"q": "hours"},
                                       headers=headers), 404)
        await problem(await client.post(url(agent), params={"source": "a.txt"}, data=HOURS,
                                        headers=headers), 404)


async def test_bad_uploads_and_parameters(client: Any, keys: dict[str, str]) -> None:
    headers = {"X-API-Key": keys["acme"]}
    cases = [
        ({"source": "virus.exe"}, b"MZ...", "unsupported file type"),
        ({"source": "broken.pdf"}, b"this is not a PDF", "broken.pdf"),
        ({"source": "empty.txt"}, b"", "empty"),
        ({"source": "blank.txt"}, b"   \n\n  ", "no text"),
        ({}, HOURS, "?source="),
        ({"source": "a.txt", "org_wide": "maybe"}, HOURS, "org_wide"),
    ]
    for params, data, detail in cases:
        body = await problem(await client.post(url(), params=params, data=data,
                                               headers=headers), 400)
        assert detail in body["detail"], (params, body)

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("note", "no file here")
    body = await problem(await client.post(url(), data=form, headers=headers), 400)
    assert "no file part" in body["detail"]

    await problem(await client.get(url(suffix="/search"), headers=headers), 400)
    await problem(await client.get(url(suffix="/search"), params={"q": "x", "k": "0"},
                                   headers=headers), 400)
    listed = await (await client.get(url(), headers=headers)).json()
    assert listed["documents"] == []


async def test_documents_past_the_limit_are_refused(client: Any, keys: dict[str, str]) -> None:
    headers = {"X-API-Key": keys["acme"]}
    big = b"word " * 2000  # 10,000 bytes; the test app allows 4,096
    body = await problem(await client.post(url(), params={"source": "big.txt"}, data=big,
                                           headers=headers), 413)
    assert "4,096" in body["detail"]

    async def chunked() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b"word " * 200

    await problem(await client.post(url(), params={"source": "big.txt"}, data=chunked(),
                                    headers=headers), 413)
    form = aiohttp.FormData()
    form.add_field("file", big, filename="big.txt", content_type="text/plain")
    await problem(await client.post(url(), data=form, headers=headers), 413)


async def test_documents_or_names_too_long_to_index_are_refused_not_server_errors(
        pool: Any, keys: dict[str, str]) -> None:
    # Under the upload limit, yet a 500: a list with no spaces (a price list exported with
    # commas) is one chunk, as a word is never cut, and its full-text index passed Postgres's
    # 1 MB tsvector limit; a name of thousands of characters passed the btree's row limit.
    headers = {"X-API-Key": keys["acme"]}
    async with TestClient(TestServer(create_app(pool=pool, max_upload_bytes=2_000_000))) as c:
        numbers = ",".join(str(n) for n in range(150_000)).encode()  # 0.9 MB
        body = await problem(await c.post(url(), params={"source": "codes.txt"}, data=numbers,
                                          headers=headers), 400)
        assert "codes.txt" in body["detail"] and "too long" in body["detail"]
        body = await problem(await c.post(url(), params={"source": "x" * 3000 + ".txt"},
                                          data=HOURS, headers=headers), 400)
        assert "name" in body["detail"]
        listed = await (await c.get(url(), headers=headers)).json()
        assert listed["documents"] == []


async def test_nul_characters_in_a_document_or_a_question_are_dropped(
        client: Any, keys: dict[str, str]) -> None:
    from .test_knowledge_extract import minimal_pdf

    headers = {"X-API-Key": keys["acme"]}
    # A PDF's unmapped glyph extracts as U+0000, which Postgres text cannot hold.
    response = await client.post(url(), params={"source": "prices.pdf"}, headers=headers,
                                 data=minimal_pdf("Teeth cleaning costs $95 \x00 per visit"))
    assert response.status == 201, await response.text()
    response = await client.get(url(suffix="/search"), params={"q": "cleaning\x00"},
                                headers=headers)
    assert response.status == 200, await response.text()
    found = (await response.json())["chunks"]
    assert [c["text"] for c in found] == ["Teeth cleaning costs $95 per visit"]
    await problem(await client.get(url(suffix="/search"), params={"q": "\x00"},
                                   headers=headers), 400)
    body = await problem(await client.post(url(), params={"source": "prices\x00.txt"},
                                           data=HOURS, headers=headers), 400)
    assert "NUL" in body["detail"]


async def test_each_endpoint_needs_its_knowledge_scope(client, keys) -> None:
    # Uploaded knowledge is read out to callers: a reporting or approving key may not add any.
    for name in ("calls", "approver", "reader"):
        response = await client.post(url(suffix="?source=prices.md&org_wide=true"), data=PRICES,
                                     headers={"X-API-Key": keys[name]})
        body = await problem(response, 403)
        assert body["required_scope"] == "knowledge:write", name
    for name in ("calls", "approver"):
        for suffix in ("", "/search?q=cleaning"):
            response = await client.get(url(suffix=suffix), headers={"X-API-Key": keys[name]})
            assert (await problem(response, 403))["required_scope"] == "knowledge:read"

    response = await client.post(url(suffix="?source=prices.md"), data=PRICES,
                                 headers={"X-API-Key": keys["acme"]})  # a default key may
    assert response.status == 201, await response.text()
    response = await client.get(url(suffix="/search?q=cleaning"),
                                headers={"X-API-Key": keys["reader"]})
    assert response.status == 200 and "$95" in str(await response.json())
