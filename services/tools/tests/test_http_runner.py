"""The HTTP runner against a loopback endpoint (no NATS or Postgres needed)."""

import email.utils
import json
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from parley.common.tools.definitions import parse_http_tool
from parley.tools.http_tool import retry_after_s, run_http_tool

from .conftest import serving

SECRET = "sk_live_0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
async def endpoint():
    """Answers every path; records ``METHOD raw_path`` of each request."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        if request.path.startswith("/echo/"):  # echoes the Authorization header after padding
            status, padding = request.path.split("/")[2:4]
            text = "d" * int(padding) + str(request.headers.get("Authorization")) + "!"
            return web.Response(status=int(status), text=text)
        if request.path == "/total":  # the client id also appears among the digits
            return web.json_response({"order_total_cents": 1123456, "client": "c-123456"})
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


@pytest.mark.parametrize("status", [401, 503])
async def test_no_beginning_of_an_echoed_secret_survives_the_error_snippet(endpoint, status):
    base, _ = endpoint
    tool = http_tool(base + f"/echo/{status}/480", headers={"Authorization": "Bearer {secret:crm}"},
                     method="GET")
    outcome = await run(tool, {}, {"crm": SECRET})
    assert not outcome.ok
    assert SECRET[:3] not in outcome.error, outcome.error[-60:]
    assert "d" * 10 + "Bearer [redacted]!" in outcome.error


@pytest.mark.parametrize("status", [401, 503])
async def test_no_beginning_of_an_echoed_secret_survives_an_error_body_cut_at_a_small_cap(
        endpoint, status):
    # A tool capped at 64 bytes reads at most the cap and the longest secret's length of an
    # error body; the snippet (up to 500 characters) kept all of that, so a secret echoed past
    # the cap was cut inside itself, went unmatched, and its beginning reached tool.failed.
    base, _ = endpoint
    tool = http_tool(base + f"/echo/{status}/70", headers={"Authorization": "Bearer {secret:crm}"},
                     method="GET", max_response_bytes=64)
    outcome = await run(tool, {}, {"crm": SECRET})
    assert not outcome.ok
    assert SECRET[:8] not in outcome.error, outcome.error


async def test_no_beginning_of_an_echoed_secret_survives_the_size_cut(endpoint):
    base, _ = endpoint
    tool = http_tool(base + "/echo/200/1000", headers={"Authorization": "{secret:crm}"},
                     method="GET", max_response_bytes=1010)
    outcome = await run(tool, {}, {"crm": SECRET})
    assert outcome.ok and outcome.truncated
    assert outcome.result["partial_body"] == "d" * 1000 + "[redacted]"


@pytest.mark.parametrize("escape", [
    lambda text: text.replace("/", "\\/"),  # PHP's json_encode escapes every slash
    lambda text: text.replace("<", "\\u003c").replace(">", "\\u003e"),  # Go's HTML-safe JSON
])
@pytest.mark.parametrize("status, cap", [(401, 16_384), (200, 100)])
async def test_a_secret_echoed_in_an_escaped_json_form_is_redacted(status, cap, escape):
    # A base64 key (with "/") or a password (with "<") comes back from a PHP or Go endpoint
    # escaped as JSON allows: in the error snippet, or in a body cut to the size cap, that text
    # is passed on unparsed, and only the secret's plain and Python-escaped forms were redacted.
    secret = "wJalrXUtnFEMI/K7MDENG/bPxR<fiCY>EXAMPLEKEY"

    async def echo(request: web.Request) -> web.Response:
        quoted = escape(json.dumps({"error": "bad key " + request.headers["X-Key"]}))
        return web.Response(status=status, text=quoted + " " * 200,
                            content_type="application/json")

    async with serving("GET", "/echo", echo) as url:
        tool = http_tool(url, method="GET", headers={"X-Key": "{secret:key}"},
                         max_response_bytes=cap)
        outcome = await run(tool, {}, {"key": secret})
    text = json.dumps(msgspec.to_builtins(outcome))
    assert "wJalrX" not in text and "EXAMPLEKEY" not in text, text
    assert "[redacted]" in text, text


@pytest.mark.parametrize("pasted", [SECRET + " ", "\t" + SECRET, " " + SECRET + "\t "])
async def test_a_secret_pasted_with_blanks_around_it_is_redacted_as_the_endpoint_echoes_it(
        endpoint, pasted):
    # A header value's leading and trailing blanks are not part of it (RFC 9110): the endpoint
    # receives and echoes the key without them, and only the value as set was redacted.
    base, _ = endpoint
    tool = http_tool(base + "/echo/401/10", headers={"Authorization": "{secret:crm}"},
                     method="GET")
    outcome = await run(tool, {}, {"crm": pasted})
    assert not outcome.ok
    assert SECRET[:8] not in outcome.error, outcome.error
    assert "d" * 10 + "[redacted]!" in outcome.error


@pytest.mark.parametrize("charset, secret", [("utf-16", SECRET), ("iso-8859-1", "clé-secrète-42")])
async def test_an_error_body_in_its_declared_charset_has_the_secret_redacted(charset, secret):
    # The snippet was read as UTF-8 whatever the charset: a UTF-16 401 echoing the key came
    # out as its characters between NULs (U+FFFD in tool.failed), a Latin-1 one as the key
    # with a replacement character for each accented letter; neither matched the secret.
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=401, body=f"bad key {request.headers['X-Key']}".encode(charset),
                            content_type="text/plain", charset=charset)

    async with serving("GET", "/echo", echo) as url:
        tool = http_tool(url, method="GET", headers={"X-Key": "{secret:key}"})
        outcome = await run(tool, {}, {"key": secret})
    assert not outcome.ok
    assert outcome.error.endswith("401: bad key [redacted]"), outcome.error


@pytest.mark.parametrize("charset", ["idna", "undefined", "no-such-charset"])
async def test_an_error_body_in_a_charset_that_cannot_be_decoded_is_read_as_utf8(charset):
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=404, body="Kunde Müller unbekannt".encode(),
                            headers={"Content-Type": f"text/plain; charset={charset}"})

    async with serving("GET", "/customer", refuse) as url:
        outcome = await run(http_tool(url, method="GET"), {})
    assert not outcome.ok and outcome.error == "t answered 404: Kunde Müller unbekannt", outcome


async def test_redaction_never_touches_the_numbers_of_a_result(endpoint):
    base, _ = endpoint
    tool = http_tool(base + "/total", headers={"X-Client-Id": "{secret:client_id}"},
                     method="POST")
    outcome = await run(tool, {}, {"client_id": "123456"})
    assert outcome.ok, outcome.error
    assert outcome.result == {"order_total_cents": 1123456, "client": "c-[redacted]"}


async def test_a_binary_body_is_described_not_passed_as_text():
    async def logo(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", content_type="image/png")

    async with serving("GET", "/logo", logo) as url:
        outcome = await run(http_tool(url, method="GET"), {})
    assert outcome.ok
    assert outcome.result == {"binary": True, "content_type": "image/png", "bytes": 16}


async def test_a_secret_a_header_cannot_carry_fails_readably_without_a_request(endpoint):
    # e.g. a token pasted with its trailing newline: aiohttp refuses the header (ValueError),
    # which came out as "the tool failed unexpectedly", retryable, with a traceback.
    base, seen = endpoint
    tool = http_tool(base + "/x", headers={"Authorization": "Bearer {secret:crm}"},
                     method="GET")
    outcome = await run(tool, {}, {"crm": SECRET + "\n"})
    assert not outcome.ok and outcome.retryable is False
    assert "'crm'" in outcome.error and SECRET[:6] not in outcome.error
    assert seen == []


@pytest.fixture
async def limited():
    """Answers with the statuses and Retry-After values queued, then 200."""
    answers: list[tuple[int, str | None]] = []
    hits: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        if answers:
            status, after = answers.pop(0)
            return web.Response(status=status, text="slow down",
                                headers={"Retry-After": after} if after else {})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", answers, hits
    await server.close()


async def test_a_rate_limited_call_is_retried_after_the_wait_the_endpoint_asks_for(limited):
    base, answers, hits = limited
    answers += [(429, "1"), (503, None)]
    tool = http_tool(base + "/orders", method="GET",
                     retry={"attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 2})
    outcome = await run(tool, {})
    assert outcome.ok and outcome.result == {"ok": True}
    assert len(hits) == 3
    assert hits[1] - hits[0] >= 1.0  # Retry-After: 1, not the 10 ms backoff
    assert hits[2] - hits[1] < 0.5  # no Retry-After: the backoff


async def test_a_wait_longer_than_the_policy_allows_ends_the_call_at_once_saying_so(limited):
    base, answers, hits = limited
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    for after in ("120", later):
        answers.append((429, after))
        tool = http_tool(base + "/orders", method="GET", retry={"attempts": 3,
                                                                "backoff_max_s": 2})
        outcome = await run(tool, {})
        assert not outcome.ok and outcome.retryable
        assert "answered 429" in outcome.error and "retry after" in outcome.error, outcome.error
    assert len(hits) == 2  # one attempt each


@pytest.mark.parametrize("after", ["\u00b2", "\u2075"])  # superscript digits: isdigit, not float
async def test_a_retry_after_that_is_no_number_is_ignored(after):
    # Read on every answer, it raised ValueError: the tool "failed unexpectedly" (with a
    # traceback) though the endpoint answered 200.
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"Retry-After": after})

    async with serving("GET", "/x", answer) as url:
        outcome = await run(http_tool(url, method="GET"), {})
    assert outcome.ok and outcome.result == {"ok": True}, outcome
    assert retry_after_s(after) == 0.0


def test_retry_after_reads_seconds_and_dates():
    assert retry_after_s("30") == 30.0
    assert retry_after_s(" 0 ") == 0.0
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT",
                         now=datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC).timestamp()) == 30.0
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT",
                         now=datetime(2026, 10, 21, 8, 0, tzinfo=UTC).timestamp()) == 0.0
    assert retry_after_s("soon") == retry_after_s(None) == retry_after_s("-5") == 0.0


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    ("Kunde: Müller".encode("iso-8859-1"), "text/plain; charset=iso-8859-1",
     {"text": "Kunde: Müller"}),
    ('{"name": "Müller"}'.encode("iso-8859-1"), "application/json; charset=ISO-8859-1",
     {"name": "Müller"}),
    ("Müller".encode(), "text/plain", {"text": "Müller"}),  # none declared: UTF-8
    ("Müller".encode(), "text/plain; charset=no-such-charset", {"text": "Müller"}),
    # codecs Python knows but that cannot decode a body (UnicodeError, not LookupError)
    ("Müller".encode(), "text/plain; charset=idna", {"text": "Müller"}),
    ("Müller".encode(), "text/plain; charset=undefined", {"text": "Müller"}),
])
async def test_a_body_is_read_in_its_declared_charset(body, content_type, expected):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    async with serving("GET", "/customer", handler) as url:
        outcome = await run(http_tool(url, method="GET"), {})
    assert outcome.ok and outcome.result == expected, outcome


async def test_a_templates_own_idempotency_key_is_the_only_one_sent():
    seen: list[list[str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("Idempotency-Key"))
        return web.json_response({})

    async with serving("POST", "/orders", record) as url:
        tool = http_tool(url, headers={"idempotency-key": "order-42"})
        assert (await run(tool, {})).ok
        tool = http_tool(url)
        assert (await run(tool, {})).ok
    assert seen == [["order-42"], ["toolu_1"]]  # before: both, the default added beside it
