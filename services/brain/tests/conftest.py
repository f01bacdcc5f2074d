"""Brain worker fixtures: real NATS and Postgres, the anthropic emulator, an event recorder."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from parley.brain.knowledge import retrieve
from parley.brain.llm.openai_compat import OpenAICompatLlm
from parley.brain.llm.router import LlmRouter
from parley.brain.worker import BrainServices, BrainWorker
from parley.common.configuration import AgentSettings, create_agent, create_org
from parley.common.events import CallRequested, CallStreamStarted, Event, TurnUserEnded, decode
from parley.devkit.emulators.anthropic import AnthropicEmulator
from parley.devkit.emulators.openai_compat import OpenAICompatEmulator

ORG, AGENT = "dental", "reception"
SETTINGS = AgentSettings(prompt="You are the receptionist of Bright Smile Dental.",
                         greeting="Thanks for calling Bright Smile Dental!")


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def on_message(self, msg: Any) -> None:
        self.events.append(decode(msg.data))

    def of(self, kind: str, call_id: str) -> list[Any]:
        return [e for e in self.events if e.type == kind and e.call_id == call_id]

    async def wait(self, kind: str, call_id: str, count: int = 1, timeout: float = 15.0,
                   where=lambda e: True) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len([e for e in self.of(kind, call_id) if where(e)]) < count:
            assert time.monotonic() < deadline, [e.type for e in self.events]
            await asyncio.sleep(0.01)
        return [e for e in self.of(kind, call_id) if where(e)]


@pytest.fixture
async def recorder(bus):
    rec = Recorder()
    sub = await bus.nc.subscribe("parley.ev.>", cb=rec.on_message)
    yield rec
    await sub.unsubscribe()


@pytest.fixture
async def pool(database_url):
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await create_org(conn, ORG, "Bright Smile Dental")
        await create_agent(conn, ORG, "Reception", SETTINGS, agent_id=AGENT)
    async with AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False) as p:
        yield p


@pytest.fixture
async def emulator():
    emu = AnthropicEmulator(api_key="sk-test")
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def openai_emulator() -> AsyncIterator[OpenAICompatEmulator]:
    server = OpenAICompatEmulator(api_key="sk-test")
    await server.start()
    yield server
    await server.stop()


def openai_llm(emulator: OpenAICompatEmulator) -> OpenAICompatLlm:
    """The OpenAI-compatible provider (named "openai") on that emulator."""
    return OpenAICompatLlm(base_url=f"{emulator.base_url}/v1", model="llama3",
                           api_key="sk-test", name="openai")


def services(bus, pool, providers, **overrides: Any) -> BrainServices:
    async def agents(org_id: str, agent_id: str) -> AgentSettings:
        return SETTINGS

    async def tools(org_id: str, agent_id: str) -> list:
        return []

    async def knowledge(org_id: str, agent_id: str, query: str) -> list:
        return await retrieve(pool, org_id, agent_id, query, k=3)

    async def profile(org_id: str, call_id: str, number: str) -> str:
        return ""

    return BrainServices(**{"bus": bus, "router": LlmRouter(providers, filler_after_ms=None),
                            "agents": agents, "tools": tools, "retrieve": knowledge,
                            "profile": profile, **overrides})


@contextlib.asynccontextmanager
async def running_brain(bus, pool, providers, **overrides: Any) -> AsyncIterator[BrainWorker]:
    """A started brain worker on ``services(bus, pool, providers, **overrides)``; on leaving, the
    worker is stopped and the providers that hold a client (``aclose``) are closed."""
    worker = BrainWorker(services(bus, pool, providers, **overrides))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        for provider in providers:
            if hasattr(provider, "aclose"):
                await provider.aclose()


async def open_call(bus, call_id: str) -> None:
    await bus.publish(CallRequested(org_id=ORG, call_id=call_id, direction="inbound",
                                    agent_id=AGENT, from_number="+14155550123",
                                    to_number="+14155550100"))
    await bus.publish(CallStreamStarted(org_id=ORG, call_id=call_id, stream_id="MZ1",
                                        gateway_instance="gw", agent_id=AGENT))


async def user_says(bus, call_id: str, turn_id: str, text: str) -> None:
    await bus.publish(TurnUserEnded(org_id=ORG, call_id=call_id, turn_id=turn_id, text=text))


def turn_context(request: dict) -> str:
    """The turn's context an Anthropic request carried: the ``<turn_context>`` text block that
    ends its final user message, after the cached conversation ("" when there is none)."""
    user = [m for m in request["messages"] if m["role"] == "user"]
    content = user[-1]["content"] if user else ""
    last = content[-1] if isinstance(content, list) and content else {}
    text = last.get("text", "") if last.get("type") == "text" else ""
    return text if text.startswith("<turn_context>") else ""


def conversation(request: dict) -> list[dict]:
    """An Anthropic request's messages as the conversation: without the turn's context block
    nor cache marks, and a message of one text block as its text (the API's shorthand)."""
    context = turn_context(request)
    messages = []
    for message in request["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [{k: v for k, v in block.items() if k != "cache_control"}
                       for block in content
                       if not (context and block.get("text") == context)]
            if len(content) == 1 and content[0]["type"] == "text":
                content = content[0]["text"]
        messages.append({**message, "content": content})
    return messages
