import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from psycopg_pool import AsyncConnectionPool

from parley.common.configuration import create_agent, create_api_key, create_org
from parley.common.events import CallRequested, Event, ToolRequested, decode
from parley.common.tools.repository import add_tool
from parley.tools.config import ToolsConfig
from parley.tools.worker import ToolsService

ORG, AGENT = "org_acme", "ag_support"
OTHER_ORG, OTHER_AGENT = "org_other", "ag_other"
CALLER = "+14155559999"
_ids = itertools.count(1)


async def wait_for(predicate, timeout=10.0, interval=0.02):
    """Poll an (async or sync) predicate until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class Events:
    """Every event published while the test runs, in arrival order."""

    def __init__(self) -> None:
        self.items: list[Event] = []

    def of(self, event_type: str, tool_call_id: str | None = None) -> list[Any]:
        return [e for e in self.items if e.type == event_type
                and (tool_call_id is None or getattr(e, "tool_call_id", None) == tool_call_id)]

    async def wait(self, event_type: str, tool_call_id: str | None = None, count: int = 1,
                   timeout: float = 10.0) -> list[Any]:
        await wait_for(lambda: len(self.of(event_type, tool_call_id)) >= count, timeout)
        return self.of(event_type, tool_call_id)

    async def outcome(self, tool_call_id: str, timeout: float = 10.0) -> Any:
        """The terminal event of a tool call."""
        terminal = ("tool.completed", "tool.failed", "tool.denied")
        await wait_for(lambda: any(self.of(t, tool_call_id) for t in terminal), timeout)
        return next(e for t in terminal for e in self.of(t, tool_call_id))


@pytest.fixture
async def events(bus):
    collected = Events()

    async def on_message(msg):
        collected.items.append(decode(msg.data))

    sub = await bus.nc.subscribe("parley.ev.>", cb=on_message)
    yield collected
    await sub.unsubscribe()


@pytest.fixture
async def pool(database_url):
    opened = AsyncConnectionPool(database_url, min_size=1, max_size=6, open=False,
                                 kwargs={"autocommit": True})
    await opened.open(wait=True)
    yield opened
    await opened.close()


@pytest.fixture
async def orgs(pool):
    """Two orgs with an agent each; org_acme allows private targets (tests hit loopback)."""
    async with pool.connection() as conn:
        for org, agent in ((ORG, AGENT), (OTHER_ORG, OTHER_AGENT)):
            await create_org(conn, org, org)
            await create_agent(conn, org, "Support", agent_id=agent)
        await conn.execute("UPDATE orgs SET allow_private_tool_targets = true "
                           "WHERE org_id = %s", (ORG,))


@pytest.fixture
async def api_key(pool, orgs):
    async with pool.connection() as conn:
        _, token = await create_api_key(conn, ORG, scopes=["tools:approve"])
    return token


@pytest.fixture
async def other_api_key(pool, orgs):
    async with pool.connection() as conn:
        _, token = await create_api_key(conn, OTHER_ORG, scopes=["tools:approve"])
    return token


@contextlib.asynccontextmanager
async def serving(method: str, path: str,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                  ) -> AsyncIterator[str]:
    """An endpoint of its own on loopback, answering ``method path`` with ``handler``, for as
    long as the block runs; yields its URL."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}{path}"
    finally:
        await server.close()


@dataclass
class Target:
    """A customer API on loopback; behaviour per path, hits counted."""

    server: TestServer
    hits: dict[str, int] = field(default_factory=dict)
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"


@pytest.fixture
async def target():
    hits: dict[str, int] = {}
    state = Target(server=None, hits=hits)  # type: ignore[arg-type]

    def count(request: web.Request) -> int:
        hits[request.path] = hits.get(request.path, 0) + 1
        state.headers.append(dict(request.headers))
        return hits[request.path]

    async def ok(request: web.Request) -> web.Response:
        count(request)
        body = await request.json() if request.can_read_body else None
        state.bodies.append(body)
        return web.json_response({"status": "found", "received": body,
                                  "query": dict(request.query)})

    async def customer(request: web.Request) -> web.Response:
        count(request)
        return web.json_response({"customer": request.match_info["customer_id"]})

    async def flaky(request: web.Request) -> web.Response:
        if count(request) <= 2:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"ok": "third time"})

    async def broken(request: web.Request) -> web.Response:
        count(request)
        return web.json_response({"error": "nope"}, status=500)

    async def slow(request: web.Request) -> web.Response:
        count(request)
        await asyncio.sleep(2)
        return web.json_response({})

    async def big(request: web.Request) -> web.Response:
        count(request)
        return web.Response(text="x" * 100_000, content_type="application/json")

    async def bad_request(request: web.Request) -> web.Response:
        count(request)
        return web.json_response({"error": "account_id is unknown"}, status=400)

    async def echo_auth(request: web.Request) -> web.Response:
        count(request)
        return web.json_response({"error": "bad token",
                                  "you_sent": request.headers.get("Authorization")}, status=401)

    app = web.Application()
    app.router.add_route("*", "/echo-auth", echo_auth)
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/customers/{customer_id}", customer)
    app.router.add_route("*", "/flaky", flaky)
    app.router.add_route("*", "/broken", broken)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/big", big)
    app.router.add_route("*", "/bad", bad_request)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.server = server
    yield state
    await server.close()


@pytest.fixture
def config(nats_url, database_url):
    return ToolsConfig(nats_url=nats_url, database_url=database_url, tools_http_port=0,
                       tools_concurrency=2, tools_sweep_interval_s=0.1,
                       tools_republish_after_s=1.0, tools_command_timeout_s=2.0,
                       tools_handoff_timeout_s=3.0)


@pytest.fixture
async def service(config, bus, pool, orgs):
    """A running tools service (in this process), stopped at teardown."""
    started: list[ToolsService] = []

    async def start(**kwargs) -> ToolsService:
        instance = ToolsService(config, bus, pool=pool, **kwargs)
        await instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.stop()


async def add_http_tool(pool, name: str, url: str, *, org=ORG, agent=AGENT, **fields) -> None:
    async with pool.connection() as conn:
        await add_tool(conn, org, agent, {"name": name, "description": f"The {name} tool.",
                                          "url": url, **fields})


async def start_call(bus, *, org=ORG, agent=AGENT) -> str:
    """Publish call.requested for a new call of the agent; returns the call id."""
    call_id = f"call_{next(_ids)}"
    await bus.publish(CallRequested(org_id=org, call_id=call_id, direction="inbound",
                                    agent_id=agent, from_number=CALLER,
                                    to_number="+14155550100"))
    return call_id


async def request_tool(bus, call_id: str, name: str, arguments: dict[str, Any] | None = None,
                       *, org=ORG, tool_call_id: str | None = None,
                       turn_id: str = "t1") -> ToolRequested:
    event = ToolRequested(org_id=org, call_id=call_id, turn_id=turn_id,
                          tool_call_id=tool_call_id or f"toolu_{next(_ids)}", name=name,
                          arguments=arguments or {})
    await bus.publish(event)
    return event
