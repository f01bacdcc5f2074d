import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest
from aiohttp import web
from psycopg.types.json import Jsonb

from parley.common.events import uuid7
from parley.common.tools.repository import set_secret

from .conftest import AGENT, ORG, add_http_tool, request_tool, serving, start_call

SCHEMA = {"type": "object", "required": ["account"], "additionalProperties": False,
          "properties": {"account": {"type": "string", "pattern": "^[0-9]+$"}}}


async def outcome_of_a_get_tool(bus, pool, service, events, name: str,
                                handler: Callable[[web.Request], Awaitable[web.Response]]):
    """The outcome of tool ``name``, a GET of an endpoint of its own answering with ``handler``,
    asked for in a new call."""
    async with serving("GET", f"/{name}", handler) as url:
        await add_http_tool(pool, name, url, method="GET")
        await service()
        request = await request_tool(bus, await start_call(bus), name)
        return await events.outcome(request.tool_call_id)


async def test_http_tool_completes_with_json_result(bus, pool, service, target, events):
    await add_http_tool(pool, "find_account", target.url("/ok"), parameters=SCHEMA)
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "find_account", {"account": "42"})

    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert done.result["status"] == "found"
    assert done.result["received"] == {"account": "42"}
    assert done.truncated is False
    assert done.causation_id == request.id
    assert target.headers[0]["Idempotency-Key"] == request.tool_call_id


async def test_get_tool_fills_url_placeholders_and_query(bus, pool, service, target, events):
    await add_http_tool(pool, "get_customer", target.url("/customers/{customer_id}"),
                        method="GET", parameters={
                            "type": "object", "required": ["customer_id"],
                            "properties": {"customer_id": {"type": "string"}}})
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "get_customer", {"customer_id": "A 42"})
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert done.result == {"customer": "A 42"}


async def test_invalid_arguments_fail_readably_and_the_next_request_is_served(
        bus, pool, service, target, events):
    await add_http_tool(pool, "find_account", target.url("/ok"), parameters=SCHEMA)
    await service()
    call_id = await start_call(bus)
    bad = await request_tool(bus, call_id, "find_account", {"account": 42, "extra": True})
    good = await request_tool(bus, call_id, "find_account", {"account": "7"})

    failed = await events.outcome(bad.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.retryable is False
    assert "invalid arguments for find_account" in failed.error
    assert "account: 42 is not of type 'string'" in failed.error
    assert "'extra' was unexpected" in failed.error
    assert (await events.outcome(good.tool_call_id)).type == "tool.completed"
    assert target.hits["/ok"] == 1


async def test_a_stored_schema_whose_ref_does_not_resolve_fails_the_call(
        bus, pool, service, target, events):
    # stored before definitions with unresolvable refs were refused: validation used to raise,
    # the request was dead-lettered and no outcome ever reached the waiting turn
    parameters = {"type": "object", "properties": {"day": {"$ref": "#/$defs/missing"}}}
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO tools (org_id, agent_id, name, definition) VALUES (%s, %s, %s, %s)",
            (ORG, AGENT, "check_slot", Jsonb({"name": "check_slot", "description": "Slots.",
                                              "url": target.url("/ok"),
                                              "parameters": parameters})))
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "check_slot", {"day": "mon"})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.retryable is False
    assert "the tool's parameter schema is unusable" in failed.error
    assert "/ok" not in target.hits


async def test_unknown_tool_fails(bus, service, events):
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "launch_rocket", {})
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert "unknown tool 'launch_rocket'" in failed.error


async def test_5xx_is_retried_until_success(bus, pool, service, target, events):
    await add_http_tool(pool, "flaky", target.url("/flaky"), method="PUT",
                        retry={"attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05})
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "flaky")
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert done.result == {"ok": "third time"}
    assert target.hits["/flaky"] == 3


async def test_post_is_not_retried_unless_declared_idempotent(bus, pool, service, target,
                                                               events):
    fast = {"attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    await add_http_tool(pool, "unsafe", target.url("/broken"), method="POST", retry=fast)
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "unsafe")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.retryable is True
    assert "answered 500" in failed.error
    assert target.hits["/broken"] == 1


async def test_exhausted_retries_fail_retryable(bus, pool, service, target, events):
    await add_http_tool(pool, "broken", target.url("/broken"), method="POST", retry={
        "attempts": 2, "backoff_initial_s": 0.01, "retry_unsafe_methods": True})
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "broken")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is True
    assert "after 2 attempts" in failed.error
    assert target.hits["/broken"] == 2


async def test_timeout_fails_retryable(bus, pool, service, target, events):
    await add_http_tool(pool, "slow", target.url("/slow"), timeout_s=0.3,
                        retry={"attempts": 1})
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "slow")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert failed.retryable is True
    assert "timed out after 0.3s" in failed.error


async def test_4xx_fails_not_retryable_with_the_body_for_the_model(bus, pool, service, target,
                                                                   events):
    await add_http_tool(pool, "bad", target.url("/bad"), method="GET")
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "bad")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed" and failed.retryable is False
    assert "answered 400" in failed.error and "account_id is unknown" in failed.error
    assert target.hits["/bad"] == 1


async def test_oversized_response_is_truncated_with_a_note(bus, pool, service, target, events):
    await add_http_tool(pool, "big", target.url("/big"), max_response_bytes=1000)
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "big")
    done = await events.outcome(request.tool_call_id)
    assert done.type == "tool.completed", done
    assert done.truncated is True
    assert done.result["partial_body"] == "x" * 1000
    assert "longer than 1000 bytes" in done.result["note"]


async def test_redelivered_request_does_not_run_the_tool_twice(bus, pool, service, target,
                                                               events):
    await add_http_tool(pool, "find_account", target.url("/ok"), parameters=SCHEMA)
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "find_account", {"account": "1"})
    await events.outcome(request.tool_call_id)

    # The same tool call again under a new message id: what a redelivery after a crash, or a
    # republish by the brain, looks like to the tools service.
    again = msgspec.structs.replace(request, id=uuid7())
    await bus.publish(again)
    marker = await request_tool(bus, call_id, "find_account", {"account": "2"})
    await events.outcome(marker.tool_call_id)  # processed after the duplicate

    assert target.hits["/ok"] == 2  # the original and the marker, not the duplicate
    assert len(events.of("tool.completed", request.tool_call_id)) == 1


async def test_secret_header_is_sent_but_never_logged_or_echoed(bus, pool, service, target,
                                                                events, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-crm-token-0123456789"
    async with pool.connection() as conn:
        await set_secret(conn, ORG, "crm_token", secret)
    headers = {"Authorization": "Bearer {secret:crm_token}"}
    await add_http_tool(pool, "crm", target.url("/ok"), headers=headers)
    await add_http_tool(pool, "crm_echo", target.url("/echo-auth"), headers=headers)
    await service()
    call_id = await start_call(bus)
    ok = await request_tool(bus, call_id, "crm", {"q": 1})
    echoed = await request_tool(bus, call_id, "crm_echo")

    assert (await events.outcome(ok.tool_call_id)).type == "tool.completed"
    failed = await events.outcome(echoed.tool_call_id)
    assert failed.type == "tool.failed"
    assert "[redacted]" in failed.error
    assert target.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text
    assert all(secret not in repr(event) for event in events.items)


async def test_missing_secret_fails_clearly(bus, pool, service, target, events):
    await add_http_tool(pool, "crm", target.url("/ok"),
                        headers={"Authorization": "Bearer {secret:nope}"})
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "crm")
    failed = await events.outcome(request.tool_call_id)
    assert failed.type == "tool.failed"
    assert "secret 'nope'" in failed.error
    assert "/ok" not in target.hits


async def test_a_deeply_nested_json_answer_is_passed_as_text(bus, pool, service, events):
    # Nested deeper than the readers of events recurse (the tools service's own NUL scrub of
    # the result failed at ~500 levels, after the tool ran): the outcome never came, and the
    # run was reported ~a minute later as "may or may not have taken effect".
    body = "[" * 600 + "]" * 600

    async def deep(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    done = await outcome_of_a_get_tool(bus, pool, service, events, "deep", deep)
    assert done.type == "tool.completed", done
    assert done.result == {"text": body}


async def test_slow_tools_do_not_hold_up_another_calls_tool(bus, pool, service, target, events):
    # As many slow tools as the service has pullers (2 here; 8 by default), each taking 2 s:
    # before, another call's tool (an end_call, a lookup) waited for one of them to finish.
    await add_http_tool(pool, "slow", target.url("/slow"), timeout_s=5)
    await add_http_tool(pool, "find", target.url("/ok"))
    await service()
    slow = [await request_tool(bus, await start_call(bus), "slow") for _ in range(2)]
    await asyncio.sleep(0.3)  # both taken in and running
    started = time.monotonic()
    quick = await request_tool(bus, await start_call(bus), "find")
    done = await events.outcome(quick.tool_call_id)
    assert done.type == "tool.completed"
    assert time.monotonic() - started < 1.0  # not after a slow one's 2 s
    for request in slow:
        assert (await events.outcome(request.tool_call_id)).type == "tool.completed"


async def test_stopping_the_service_lets_the_runs_in_hand_finish_and_report(
        bus, pool, service, target, events):
    await add_http_tool(pool, "slow", target.url("/slow"), timeout_s=5)
    instance = await service()
    request = await request_tool(bus, await start_call(bus), "slow")
    await asyncio.sleep(0.3)
    await instance.stop()  # (before, the puller itself ran it: stop waited for it the same way)
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"


async def test_a_json_answer_with_a_lone_surrogate_completes_with_a_replacement_character(
        bus, pool, service, events):
    # JavaScript's substring cuts an emoji in half and JSON.stringify writes the half as
    # "\ud83d", which Python's json reads into a string no event can encode (UTF-8 has no
    # surrogates): the outcome never came, and the run was reported ~a minute later as "may
    # or may not have taken effect".
    body = '{"summary": "Great news \\ud83d", "\\udc00": "ok"}'

    async def cut(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    done = await outcome_of_a_get_tool(bus, pool, service, events, "cut", cut)
    assert done.type == "tool.completed", done
    assert done.result == {"summary": "Great news \ufffd", "\ufffd": "ok"}


@pytest.mark.parametrize("status", [200, 401])
async def test_a_body_whose_charset_decodes_to_half_a_surrogate_pair_has_an_outcome(
        bus, pool, service, events, status):
    # UTF-7 (an IANA charset, as unicode-escape is a Python codec) writes half a surrogate pair
    # as "+2D0-"; read in its declared charset the body held one, which no event can encode:
    # the answer of a text/plain body (or the snippet of an error) raised building the outcome,
    # and the run was reported ~a minute later as "may or may not have taken effect".
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=b"Great news +2D0-",
                            headers={"Content-Type": "text/plain; charset=utf-7"})

    done = await outcome_of_a_get_tool(bus, pool, service, events, "utf7", answer)
    if status == 200:
        assert done.type == "tool.completed", done
        assert done.result == {"text": "Great news \ufffd"}
    else:
        assert done.type == "tool.failed", done
        assert done.error == "utf7 answered 401: Great news \ufffd"
