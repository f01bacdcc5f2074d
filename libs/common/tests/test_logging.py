from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from parley.common.logging import configure_logging, log_context, redact


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    previous_level = root.level
    buffer = io.StringIO()
    handler = configure_logging("gateway", level="DEBUG", stream=buffer)
    yield buffer
    root.removeHandler(handler)
    handler.close()
    root.setLevel(previous_level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_one_json_object_per_line_with_standard_fields(stream: io.StringIO) -> None:
    logging.getLogger("parley.gateway.app").info("call %s answered", "c-1")
    logging.getLogger("other").debug("second line")
    first, second = lines(stream)
    assert first["level"] == "INFO"
    assert first["service"] == "gateway"
    assert first["logger"] == "parley.gateway.app"
    assert first["msg"] == "call c-1 answered"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "call_id" not in first and "trace_id" not in first and "exc" not in first
    assert second["level"] == "DEBUG"


def test_level_filters_records() -> None:
    buffer = io.StringIO()
    root = logging.getLogger()
    previous_level = root.level
    handler = configure_logging("brain", level="warning", stream=buffer)
    try:
        logging.getLogger("x").info("hidden")
        logging.getLogger("x").warning("shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    assert [entry["msg"] for entry in lines(buffer)] == ["shown"]


def test_reconfiguring_replaces_our_handler(stream: io.StringIO) -> None:
    second = io.StringIO()
    handler = configure_logging("gateway", stream=second)
    try:
        logging.getLogger("x").warning("once")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue() == ""
    assert len(lines(second)) == 1


def test_extra_fields_and_exception(stream: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed", extra={"attempt": 3, "vendor": "deepgram"})
    (entry,) = lines(stream)
    assert entry["attempt"] == 3
    assert entry["vendor"] == "deepgram"
    assert "RuntimeError: boom" in entry["exc"]


def test_log_context_is_nestable(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    with log_context(org_id="org-1"):
        with log_context(call_id="call-1"):
            log.info("inner")
        log.info("outer")
    log.info("none")
    inner, outer, none = lines(stream)
    assert (inner["org_id"], inner["call_id"]) == ("org-1", "call-1")
    assert outer["org_id"] == "org-1" and "call_id" not in outer
    assert "org_id" not in none


async def test_log_context_is_isolated_between_tasks(stream: io.StringIO) -> None:
    log = logging.getLogger("x")

    async def handle(call_id: str) -> None:
        with log_context(call_id=call_id):
            await asyncio.sleep(0)
            log.info("handling")
            await asyncio.sleep(0)
            log.info("done")

    await asyncio.gather(handle("a"), handle("b"))
    by_call: dict[str, list[str]] = {}
    for entry in lines(stream):
        if entry["logger"] != "x":
            continue  # e.g. asyncio's own debug line about the selector
        by_call.setdefault(entry["call_id"], []).append(entry["msg"])
    assert by_call == {"a": ["handling", "done"], "b": ["handling", "done"]}


def test_trace_and_span_ids_from_current_span(stream: io.StringIO) -> None:
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("work") as span:
        logging.getLogger("x").info("traced")
    provider.shutdown()
    (entry,) = lines(stream)
    context = span.get_span_context()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")


def test_secrets_never_reach_the_log(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.info("connecting to postgresql://parley:hunter2@db:5432/parley")
    log.info(
        "request",
        extra={"api_key": "sk-1", "headers": {"Authorization": "Bearer abc"}, "input_tokens": 9},
    )
    log.info("sent Authorization: Bearer abc and token=xyz")
    text = stream.getvalue()
    for secret in ("hunter2", "sk-1", "abc", "xyz"):
        assert secret not in text
    url, request, header = lines(stream)
    assert url["msg"] == "connecting to postgresql://parley:***@db:5432/parley"
    assert request["api_key"] == "***"
    assert request["headers"] == {"Authorization": "***"}
    assert request["input_tokens"] == 9
    assert header["msg"] == "sent Authorization: Bearer *** and token=***"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("clientSecret", True),
        ("access_token", True),
        ("apiKey", True),
        ("x-api-key", True),
        ("X-Twilio-Signature", True),
        ("authorization", True),
        ("max_tokens", False),
        ("call_id", False),
    ],
)
def test_redact_secret_keys(key: str, secret: bool) -> None:
    assert (redact({key: "value"})[key] == "***") is secret


def test_redact_objects_rendered_as_text() -> None:
    class Settings:
        def __repr__(self) -> str:
            return "Settings(url='nats://svc:pw@nats:4222')"

    assert redact([Settings(), 1, None]) == ["Settings(url='nats://svc:***@nats:4222')", 1, None]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_vendor_http_clients_log_a_request_only_at_debug(level: str) -> None:
    root = logging.getLogger()
    previous_level = root.level
    buffer = io.StringIO()
    handler = configure_logging("brain", level=level, stream=buffer)
    try:
        logging.getLogger("httpx2").info("HTTP Request: POST %s", "http://x/v1/messages")
        logging.getLogger("httpx2").warning("retrying")
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous_level)
    expected = ["retrying"] if level == "INFO" else [
        "HTTP Request: POST http://x/v1/messages", "retrying"]
    assert [line["msg"] for line in lines(buffer)] == expected
