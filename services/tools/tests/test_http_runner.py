"""The HTTP runner against a loopback endpoint (no NATS or Postgres needed)."""

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from parley.common.tools.definitions import parse_http_tool
from parley.tools.http_tool import run_http_tool

SECRET = "sk_live_0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
async def endpoint():
    """Answers every path; records ``METHOD raw_path`` of each request."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", seen
    await server.close()


def http_tool(url: str, **fields):
    return parse_http_tool({"name": "t", "description": "The t tool.", "url": url, **fields})


async def run(tool, arguments, secrets=None):
    async with aiohttp.ClientSession() as session:
        return await run_http_tool(session, tool, arguments, secrets=secrets or {},
                                   tool_call_id="toolu_1", allow_private=True)


@pytest.mark.parametrize("arguments", [{"customer_id": ".."}, {"customer_id": "."},
                                       {"customer_id": "%2E%2E"}])
async def test_a_path_argument_cannot_climb_out_of_the_templated_path(endpoint, arguments):
    base, seen = endpoint
    tool = http_tool(base + "/v1/customers/{customer_id}/orders", method="GET")
    outcome = await run(tool, arguments)
    assert not outcome.ok and "customer_id" in outcome.error
    assert seen == []


async def test_a_filled_path_segment_cannot_be_a_dot_segment(endpoint):
    base, seen = endpoint
    tool = http_tool(base + "/v1/customers/.{suffix}/orders", method="GET")
    outcome = await run(tool, {"suffix": ""})
    assert not outcome.ok and "'.'" in outcome.error
    assert seen == []


async def test_dots_inside_a_path_argument_are_sent_as_they_are(endpoint):
    base, seen = endpoint
    tool = http_tool(base + "/v1/files/{name}", method="GET")
    outcome = await run(tool, {"name": "..report.v2"})
    assert outcome.ok and outcome.result == {"path": "/v1/files/..report.v2"}
    assert seen == ["GET /v1/files/..report.v2"]
