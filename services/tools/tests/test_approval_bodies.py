"""Bodies of approve/deny the API cannot read: a 4xx problem, never a 500, nothing decided."""

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from parley.tools.approval_api import create_app

from .test_approvals import PROBLEM, sensitive_request


@pytest.fixture
async def api(pool, bus):
    async with TestClient(TestServer(create_app(pool=pool, bus=bus))) as client:
        yield client


async def problem_of(response: aiohttp.ClientResponse, status: int) -> dict:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    return await response.json(content_type=None)


@pytest.mark.parametrize("data", [
    b'{"reason": "\xff"}',  # a string that is not UTF-8
    b'{"\xc3": "x"}',  # a key cut in the middle of a character
    b'{"reason": "\\ud800"}',  # half a surrogate pair, escaped
    b"reason=too+expensive",  # a form, not JSON
    b'["reason"]',  # JSON of the wrong shape
], ids=["not-utf8", "key-not-utf8", "lone-surrogate", "form", "wrong-shape"])
async def test_an_unreadable_body_is_a_4xx_problem_and_decides_nothing(
        api, bus, pool, target, events, service, api_key, data):
    await service()
    request = await sensitive_request(bus, pool, target, events)
    response = await api.post(f"/v1/tool-calls/{request.tool_call_id}/deny", data=data,
                              headers={"X-API-Key": api_key,
                                       "Content-Type": "application/json"})
    problem = await problem_of(response, 400)
    assert problem["type"].endswith("/invalid-body")
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT state FROM tool_calls WHERE tool_call_id = %s",
                                    (request.tool_call_id,))
        assert await cursor.fetchall() == [("awaiting_approval",)]


async def test_a_body_over_the_cap_sent_in_chunks_is_a_413_problem(api, pool, api_key):
    # (aiohttp's client_max_size refused it before; read_body must go on doing so)
    async def chunks():
        yield b'{"reason": "'
        for _ in range(20):
            yield b"a" * 4096
        yield b'"}'

    response = await api.post("/v1/tool-calls/tc_1/approve", data=chunks(),
                              headers={"X-API-Key": api_key,
                                       "Content-Type": "application/json"})
    await problem_of(response, 413)


async def test_a_body_that_does_not_decompress_is_a_400_problem(api, api_key):
    response = await api.post("/v1/tool-calls/tc_1/approve", data=b"not gzip at all",
                              headers={"X-API-Key": api_key, "Content-Encoding": "gzip",
                                       "Content-Type": "application/json"})
    await problem_of(response, 400)



@pytest.mark.parametrize("tool_call_id", ["a%00b", "a" * 5000], ids=["nul", "long"])
async def test_a_tool_call_id_no_call_can_have_is_a_404_problem(api, api_key, tool_call_id):
    response = await api.post(f"/v1/tool-calls/{tool_call_id}/approve",
                              headers={"X-API-Key": api_key})
    problem = await problem_of(response, 404)
    assert problem["type"].endswith("/tool-call-not-found") and len(problem["detail"]) < 200
