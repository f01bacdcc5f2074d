import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from parley.common.events import ToolCompleted, ToolRequested, encode
from parley.common.metrics import Metrics
from parley.common.tools.repository import get_tool
from parley.tools import journal
from parley.tools.builtins import Builtins
from parley.tools.call_context import CallDirectory
from parley.tools.dispatcher import Dispatcher, HttpSessions
from parley.tools.outcomes import ToolOutcome

from .conftest import AGENT, ORG, add_http_tool, request_tool, start_call


def tool_request(call_id: str, tool_call_id: str, name: str = "find") -> ToolRequested:
    return ToolRequested(org_id=ORG, call_id=call_id, turn_id="t1", tool_call_id=tool_call_id,
                         name=name, arguments={})


async def test_a_run_interrupted_by_a_crash_is_failed_not_rerun(bus, pool, service, events):
    call_id = await start_call(bus)
    request = tool_request(call_id, "toolu_crashed")
    async with pool.connection() as conn:  # what a worker that died mid-call left behind
        assert await journal.open_call(conn, request, AGENT, "running", lease_s=0.0) is None
    await service()
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.error == journal.INTERRUPTED and failed.retryable is False


async def test_an_approved_call_whose_decision_was_lost_fails_saying_it_never_ran(
        bus, pool, service, events):
    # Approved, then its tool.approved dead-lettered (a database outage through every
    # delivery): nothing would start it, and the turn waited for an outcome for ever.
    call_id = await start_call(bus)
    lost, fresh = tool_request(call_id, "toolu_lost"), tool_request(call_id, "toolu_fresh")
    async with pool.connection() as conn:
        for request in (lost, fresh):
            await journal.open_call(conn, request, AGENT, "awaiting_approval", expires_in_s=600)
            decision, _ = await journal.decide(conn, ORG, request.tool_call_id, approve=True,
                                               by="me")
            assert decision == "decided"
        # Both decisions were published, and their messages lost.
        await conn.execute("UPDATE tool_call_events SET published_at = now() "
                           "WHERE tool_call_id IN ('toolu_lost', 'toolu_fresh')")
        await conn.execute("UPDATE tool_calls SET updated_at = now() - interval '10 minutes' "
                           "WHERE tool_call_id = 'toolu_lost'")
    await service()
    failed = await events.outcome(lost.tool_call_id)
    assert failed.type == "tool.failed" and failed.error == journal.NEVER_STARTED
    assert failed.retryable
    async with pool.connection() as conn:
        assert await journal.state_of(conn, call_id, "toolu_lost") == "failed"
        # Lost only minutes ago: the consumer may still be retrying it.
        assert await journal.state_of(conn, call_id, "toolu_fresh") == "approved"


async def test_an_outcome_that_was_never_published_is_published_by_the_sweep(
        bus, pool, service, events):
    call_id = await start_call(bus)
    request = tool_request(call_id, "toolu_unpublished")
    outcome = ToolOutcome.success({"answer": 42}).event(request)
    async with pool.connection() as conn:  # committed, then NATS was unreachable
        await journal.open_call(conn, request, AGENT, "running", lease_s=60)
        assert await journal.finish(conn, request, outcome)
    await service()
    done = await events.outcome(request.tool_call_id)
    assert done.id == outcome.id and done.result == {"answer": 42}


async def test_handling_the_same_request_twice_runs_the_tool_once(bus, pool, orgs, target):
    await add_http_tool(pool, "find", target.url("/ok"))
    call_id = await start_call(bus)
    request = tool_request(call_id, "toolu_twice")
    sessions = HttpSessions(aiohttp.ClientSession(), aiohttp.ClientSession())
    dispatcher = Dispatcher(bus=bus, pool=pool, directory=CallDirectory(bus),
                            builtins=Builtins(bus.nc), sessions=sessions, metrics=Metrics("t"))
    try:
        await dispatcher.on_requested(request)
        await dispatcher.on_requested(request)
        await dispatcher.drain()
    finally:
        await sessions.guarded.close()
        await sessions.open.close()
    assert target.hits["/ok"] == 1
    async with pool.connection() as conn:
        assert await journal.state_of(conn, call_id, "toolu_twice") == "completed"
        cursor = await conn.execute(
            "SELECT type, published_at IS NOT NULL FROM tool_call_events "
            "WHERE tool_call_id = 'toolu_twice'")
        assert await cursor.fetchall() == [("tool.completed", True)]


def test_a_result_too_large_for_nats_is_cut_to_fit_and_marked_truncated():
    request = tool_request("call_big", "toolu_big")
    for result in ({"rows": "x" * 1_500_000}, {"blob": "\x01" * 170_000}):
        event = ToolOutcome.success(result).event(request)
        assert len(encode(event)) <= 512 * 1024  # well under NATS's default 1 MiB
        assert event.truncated is True
        assert event.result["partial_result"].startswith('{"')
        assert "cut off" in event.result["note"]
    small = ToolOutcome.success({"answer": 42}).event(request)
    assert small.result == {"answer": 42} and small.truncated is False


async def test_an_event_nats_refuses_is_set_aside_and_the_others_are_published(
        bus, pool, orgs, events):
    call_id = await start_call(bus)
    huge, later = tool_request(call_id, "toolu_huge"), tool_request(call_id, "toolu_later")
    refused = ToolCompleted(org_id=ORG, call_id=call_id, tool_call_id=huge.tool_call_id,
                            name="find", result={"rows": "x" * 1_500_000})  # not cut: too big
    fine = ToolOutcome.success({"answer": 42}).event(later)
    async with pool.connection() as conn:
        for request, event in ((huge, refused), (later, fine)):
            await journal.open_call(conn, request, AGENT, "running", lease_s=60)
            assert await journal.finish(conn, request, event)
        assert await journal.publish_pending(conn, bus) == 1
        assert await journal.publish_pending(conn, bus) == 0  # the refused one is not retried
        cursor = await conn.execute(
            "SELECT failure FROM tool_call_events WHERE event_id = %s AND failed_at IS NOT NULL",
            (refused.id,))
        assert "MaxPayloadError" in (await cursor.fetchone())[0]
    assert (await events.outcome(later.tool_call_id)).id == fine.id


async def test_an_oversized_result_reaches_the_model_cut_and_others_are_not_held_up(
        bus, pool, service, target, events):
    async def export(request: web.Request) -> web.Response:
        return web.Response(body=b'{"rows": "' + b"x" * 1_500_000 + b'"}',
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/export", export)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await add_http_tool(pool, "export", f"http://127.0.0.1:{server.port}/export",
                            method="GET", max_response_bytes=2_000_000)
        await add_http_tool(pool, "refund", target.url("/ok"), sensitive=True,
                            approval_timeout_s=0.5)
        await service()
        call_id = await start_call(bus)
        big = await request_tool(bus, call_id, "export")
        done = await events.outcome(big.tool_call_id)
        assert done.type == "tool.completed" and done.truncated is True
        other = await request_tool(bus, call_id, "refund", {"amount": 5})
        assert (await events.outcome(other.tool_call_id)).type == "tool.denied"
    finally:
        await server.close()


def test_an_outcome_event_never_carries_a_nul_character():
    request = tool_request("call_nul", "toolu_nul")
    done = ToolOutcome.success({"te\x00xt": ["a\x00b", 1]}).event(request)
    failed = ToolOutcome.failure("bad\x00body").event(request)
    assert done.result == {"te\ufffdxt": ["a\ufffdb", 1]} and failed.error == "bad\ufffdbody"


async def test_a_nul_in_the_model_arguments_is_refused_readably(bus, pool, service, events):
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "lookup_knowledge", {"query": "refund\x00policy"})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed" and "NUL" in failed.error
    async with pool.connection() as conn:
        assert await journal.state_of(conn, call_id, request.tool_call_id) == "failed"


class FlakyDirectory(CallDirectory):
    """A call directory whose first lookup fails (NATS blip during the replay)."""

    def __init__(self, bus) -> None:
        super().__init__(bus)
        self.failures = 1

    async def lookup(self, conn, org_id, call_id):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("NATS blip during replay")
        return await super().lookup(conn, org_id, call_id)


async def test_an_approved_call_runs_on_redelivery_after_a_failed_lookup(bus, pool, orgs, target):
    await add_http_tool(pool, "refund", target.url("/ok"), sensitive=True)
    call_id = await start_call(bus)
    request = tool_request(call_id, "toolu_refund", name="refund")
    async with pool.connection() as conn:
        tool = await get_tool(conn, ORG, AGENT, "refund")
        await journal.open_call(conn, request, AGENT, "awaiting_approval", expires_in_s=60,
                                tool_fingerprint=tool.fingerprint())
        decision, approved = await journal.decide(conn, ORG, "toolu_refund", approve=True,
                                                  by="me")
    assert decision == "decided"
    sessions = HttpSessions(aiohttp.ClientSession(), aiohttp.ClientSession())
    dispatcher = Dispatcher(bus=bus, pool=pool, directory=FlakyDirectory(bus),
                            builtins=Builtins(bus.nc), sessions=sessions, metrics=Metrics("t"))
    try:
        with pytest.raises(ConnectionError):
            await dispatcher.on_decision(approved)  # the consumer naks it
        await dispatcher.on_decision(approved)  # the redelivery
        await dispatcher.drain()
    finally:
        await sessions.guarded.close()
        await sessions.open.close()
    assert target.hits.get("/ok") == 1
    async with pool.connection() as conn:
        assert await journal.state_of(conn, call_id, "toolu_refund") == "completed"


async def test_an_approval_asked_for_before_fingerprints_were_kept_does_not_run(
        bus, pool, service, orgs, target, events):
    # a call left waiting across the upgrade has no fingerprint: what the human was shown
    # cannot be checked, so it fails asking to be called again rather than run unchecked
    await add_http_tool(pool, "refund", target.url("/ok"), sensitive=True)
    call_id = await start_call(bus)
    request = tool_request(call_id, "toolu_legacy", name="refund")
    async with pool.connection() as conn:
        await journal.open_call(conn, request, AGENT, "awaiting_approval", expires_in_s=60)
        _, approved = await journal.decide(conn, ORG, "toolu_legacy", approve=True, by="me")
    await service()
    await bus.publish(approved)
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is False
    assert "before approvals were tied to the tool's definition" in failed.error
    assert target.hits == {}
