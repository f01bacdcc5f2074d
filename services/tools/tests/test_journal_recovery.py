import aiohttp

from parley.common.events import ToolRequested
from parley.common.metrics import Metrics
from parley.tools import journal
from parley.tools.builtins import Builtins
from parley.tools.call_context import CallDirectory
from parley.tools.dispatcher import Dispatcher, HttpSessions
from parley.tools.outcomes import ToolOutcome

from .conftest import AGENT, ORG, add_http_tool, start_call


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
