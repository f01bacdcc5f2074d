import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from parley.common.bus import Bus
from parley.common.configuration import create_api_key
from parley.common.tools.repository import add_tool, delete_tool, get_tool
from parley.tools import journal
from parley.tools.approval_api import create_app

from .conftest import AGENT, ORG, add_http_tool, request_tool, start_call, wait_for

PROBLEM = "application/problem+json"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def decide(http, service, tool_call_id, verb, key, body=None):
    url = f"http://127.0.0.1:{service.http_port}/v1/tool-calls/{tool_call_id}/{verb}"
    headers = {"X-API-Key": key} if key else {}
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, response.content_type, await response.json(content_type=None)


async def sensitive_request(bus, pool, target, events, **fields):
    await add_http_tool(pool, "refund", target.url("/ok"), sensitive=True, **fields)
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "refund", {"amount": 20})
    asked = (await events.wait("tool.approval_requested", request.tool_call_id))[0]
    assert asked.name == "refund" and asked.arguments == {"amount": 20}
    return request


async def test_approve_runs_the_tool(bus, pool, service, target, events, http, api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    assert "/ok" not in target.hits

    status, _, body = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert status == 200, body
    assert body["state"] == "approved" and body["call_id"] == request.call_id

    approved = (await events.wait("tool.approved", request.tool_call_id))[0]
    assert approved.approved_by.startswith("api_key:")
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert target.hits["/ok"] == 1
    assert target.bodies == [{"amount": 20}]

    status, content_type, problem = await decide(http, tools, request.tool_call_id, "deny",
                                                 api_key)
    assert (status, content_type) == (409, PROBLEM)
    assert problem["type"].endswith("tool-call-not-waiting")


async def test_deny_reports_denied_and_never_runs(bus, pool, service, target, events, http,
                                                  api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    status, _, body = await decide(http, tools, request.tool_call_id, "deny", api_key,
                                   {"reason": "amount too high"})
    assert status == 200 and body["state"] == "denied"

    denied = await events.outcome(request.tool_call_id)
    assert denied.type == "tool.denied"
    assert denied.reason == "amount too high" and denied.denied_by.startswith("api_key:")
    assert not events.of("tool.completed", request.tool_call_id)
    assert "/ok" not in target.hits


async def test_no_decision_in_time_is_denied_by_timeout(bus, pool, service, target, events,
                                                        http, api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events, approval_timeout_s=0.3)
    denied = await events.outcome(request.tool_call_id)
    assert denied.type == "tool.denied"
    assert denied.denied_by == "timeout"
    assert "/ok" not in target.hits
    # a late decision, even the same one, did not take effect: the deadline's did
    status, _, problem = await decide(http, tools, request.tool_call_id, "deny", api_key)
    assert (status, problem["type"].rsplit("/", 1)[1]) == (409, "approval-expired")


async def test_the_same_decision_again_is_answered_as_before(bus, pool, service, target, events,
                                                            http, api_key):
    # a client that got no answer (a 500, a dropped connection) asks again to learn the outcome
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    status, _, first = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert status == 200, first
    assert first["decided_by"].startswith("api_key:")
    status, _, again = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert (status, again) == (200, first)
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
    status, _, after_run = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert (status, after_run) == (200, first)
    approved = await events.wait("tool.approved", request.tool_call_id)
    assert [str(e.id) for e in approved] == [first["event_id"]]
    assert target.hits["/ok"] == 1

    status, _, problem = await decide(http, tools, request.tool_call_id, "deny", api_key)
    assert (status, problem["type"].rsplit("/", 1)[1]) == (409, "tool-call-not-waiting")
    assert (problem["decision"], problem["decided_by"]) == ("approved", first["decided_by"])
    assert "already approved" in problem["detail"]


async def test_a_denial_again_is_answered_as_before_and_approval_refused(
        bus, pool, service, target, events, http, api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    status, _, first = await decide(http, tools, request.tool_call_id, "deny", api_key,
                                    {"reason": "no"})
    assert (status, first["state"]) == (200, "denied")
    status, _, again = await decide(http, tools, request.tool_call_id, "deny", api_key)
    assert (status, again) == (200, first)
    status, _, problem = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert (status, problem["decision"]) == (409, "denied")
    assert "/ok" not in target.hits


async def test_a_call_that_needed_no_approval_cannot_be_decided(bus, pool, service, target,
                                                               events, http, api_key):
    tools = await service()
    await add_http_tool(pool, "lookup", target.url("/ok"))
    request = await request_tool(bus, await start_call(bus), "lookup")
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
    status, _, problem = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert (status, problem["type"].rsplit("/", 1)[1]) == (409, "tool-call-not-waiting")


async def test_a_decision_stands_when_its_event_cannot_be_published_at_once(
        bus, pool, service, target, events, http, api_key, nats_url):
    # NATS down (here: the API's connection closed) after the decision committed: the client is
    # told what it decided, and the journaled event is published by the sweep
    await service()  # its sweep publishes what the journal holds, its consumers run the tool
    request = await sensitive_request(bus, pool, target, events)
    cut_off = await Bus.connect(nats_url, name="approval-api-cut-off")
    await cut_off.close()
    server = TestServer(create_app(pool=pool, bus=cut_off), host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}/v1/tool-calls/{request.tool_call_id}/approve"
        async with http.post(url, headers={"X-API-Key": api_key}) as response:
            status, body = response.status, await response.json(content_type=None)
    finally:
        await server.close()
    assert status == 200, body
    assert (body["state"], body["call_id"]) == ("approved", request.call_id)

    approved = (await events.wait("tool.approved", request.tool_call_id))[0]
    assert str(approved.id) == body["event_id"]
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
    assert target.hits["/ok"] == 1


async def test_another_orgs_tool_call_is_not_found(bus, pool, service, target, events, http,
                                                   other_api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    status, content_type, problem = await decide(http, tools, request.tool_call_id, "approve",
                                                 other_api_key)
    assert (status, content_type) == (404, PROBLEM)
    assert problem["type"].endswith("tool-call-not-found")
    status, _, _ = await decide(http, tools, "toolu_nope", "approve", other_api_key)
    assert status == 404


async def test_keys_are_checked(bus, pool, service, http, orgs):
    tools = await service()
    async with pool.connection() as conn:
        _, calls_only = await create_api_key(conn, ORG, scopes=["calls:read"])
    status, content_type, problem = await decide(http, tools, "x", "approve", None)
    assert (status, content_type, problem["type"].rsplit("/", 1)[1]) == (
        401, PROBLEM, "missing-api-key")
    status, _, problem = await decide(http, tools, "x", "approve", "pk_nope_nope")
    assert (status, problem["type"].rsplit("/", 1)[1]) == (401, "invalid-api-key")
    status, _, problem = await decide(http, tools, "x", "approve", calls_only)
    assert (status, problem["required_scope"]) == (403, "tools:approve")


async def test_a_waiting_approval_survives_a_restart(bus, pool, service, target, events, http,
                                                     api_key):
    first = await service()
    request = await sensitive_request(bus, pool, target, events)
    await first.stop()

    second = await service()
    status, _, _ = await decide(http, second, request.tool_call_id, "approve", api_key)
    assert status == 200
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"
    assert target.hits["/ok"] == 1


async def test_an_approved_tool_is_leased_for_its_worst_case_runtime(
        bus, pool, service, target, events, http, api_key):
    # a fixed 150 s lease let the sweep fail a slow endpoint still running (and drop its result)
    await add_http_tool(pool, "slow_refund", target.url("/slow"), method="PUT", timeout_s=60,
                        retry={"attempts": 3, "backoff_max_s": 2.0}, sensitive=True)
    tools = await service()
    request = await request_tool(bus, await start_call(bus), "slow_refund")
    await events.wait("tool.approval_requested", request.tool_call_id)

    status, _, _ = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert status == 200
    await wait_for(lambda: target.hits.get("/slow") == 1)
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT state, EXTRACT(EPOCH FROM lease_until - now()) FROM tool_calls "
            "WHERE call_id = %s AND tool_call_id = %s", (request.call_id, request.tool_call_id))
        state, lease_left_s = await cursor.fetchone()
        tool = await get_tool(conn, ORG, AGENT, "slow_refund")
    assert state == "running"
    assert lease_left_s > tool.worst_case_s() > 150
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"


async def replace_tool(pool, name, **definition) -> None:
    async with pool.connection() as conn:
        await add_tool(conn, ORG, AGENT, {"name": name, "description": f"The {name} tool.",
                                          **definition}, replace=True)


@pytest.mark.parametrize("change", [
    pytest.param({"url": "/customers/c_1"}, id="url"),
    pytest.param({"method": "PUT"}, id="method"),
    pytest.param({"headers": {"X-Refund-To": "acct_9"}}, id="headers"),
    pytest.param({"parameters": {"type": "object", "properties": {"amount": {"type": "integer",
                                                                           "maximum": 10**6}}}},
                 id="parameters"),
    pytest.param({"retry": {"retry_unsafe_methods": True}}, id="retry-unsafe-methods"),
])
async def test_a_tool_changed_after_approval_was_asked_for_does_not_run(
        bus, pool, service, target, events, http, api_key, change):
    # the human approved `refund {"amount": 20}` as the tool was defined when they were asked;
    # the definition changed before the approved call ran: it must not run under the new one
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    definition = {"url": target.url("/ok"), "sensitive": True, **change}
    if definition["url"].startswith("/"):
        definition["url"] = target.url(definition["url"])
    await replace_tool(pool, "refund", **definition)

    status, _, body = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert (status, body["state"]) == (200, "approved")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed", failed
    assert failed.retryable is False
    assert "changed after" in failed.error and "approval" in failed.error
    assert "call the tool again" in failed.error.lower()
    assert target.hits == {}  # neither the old endpoint nor the new one was called
    async with pool.connection() as conn:
        assert await journal.state_of(conn, request.call_id, request.tool_call_id) == "failed"


async def test_a_tool_removed_after_approval_was_asked_for_fails_without_running(
        bus, pool, service, target, events, http, api_key):
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    async with pool.connection() as conn:
        assert await delete_tool(conn, ORG, AGENT, "refund")

    status, _, _ = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert status == 200
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed", failed
    assert failed.retryable is False
    assert "removed after" in failed.error and "approval" in failed.error
    assert target.hits == {}


async def test_an_approved_call_runs_when_only_what_it_does_not_send_changed(
        bus, pool, service, target, events, http, api_key):
    # the description (the model's text), the approval deadline and the response cap do not
    # change the request the human approved; neither does saving the same definition again
    tools = await service()
    request = await sensitive_request(bus, pool, target, events)
    await replace_tool(pool, "refund", url=target.url("/ok"), sensitive=True,
                       description="Refund the caller.", approval_timeout_s=120,
                       max_response_bytes=4096, timeout_s=20)

    status, _, _ = await decide(http, tools, request.tool_call_id, "approve", api_key)
    assert status == 200
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert target.hits == {"/ok": 1} and target.bodies == [{"amount": 20}]
