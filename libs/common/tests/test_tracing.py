from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.span import TraceState

from parley.common.tracing import (
    configure_tracing,
    extract_context,
    inject_headers,
    records_spans,
    tracer,
)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def providers(exporter: InMemorySpanExporter) -> Iterator[tuple[TracerProvider, TracerProvider]]:
    gateway = configure_tracing("gateway", exporter=exporter, batch=False, set_global=False)
    brain = configure_tracing(
        "brain", exporter=exporter, batch=False, set_global=False, instance_id="brain-1"
    )
    yield gateway, brain
    gateway.shutdown()
    brain.shutdown()


def test_trace_continues_across_services_through_headers(
    providers: tuple[TracerProvider, TracerProvider], exporter: InMemorySpanExporter
) -> None:
    gateway, brain = providers
    with tracer("parley.gateway", gateway).start_as_current_span("publish call.started"):
        headers = inject_headers({"Nats-Msg-Id": "evt-1"})
    assert headers["Nats-Msg-Id"] == "evt-1"
    assert "traceparent" in headers

    # What a consumer in another process does with the received message's headers.
    with tracer("parley.brain", brain).start_as_current_span(
        "handle call.started", context=extract_context(headers)
    ):
        pass

    published, handled = exporter.get_finished_spans()
    assert published.context is not None and handled.context is not None
    assert handled.context.trace_id == published.context.trace_id
    assert handled.parent is not None and handled.parent.span_id == published.context.span_id
    assert published.resource.attributes["service.name"] == "gateway"
    assert handled.resource.attributes["service.name"] == "brain"
    assert handled.resource.attributes["service.instance.id"] == "brain-1"


def test_tracestate_is_carried(providers: tuple[TracerProvider, TracerProvider]) -> None:
    remote = trace.SpanContext(
        trace_id=0x1234,
        span_id=0x5678,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "value")]),
    )
    context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    headers = inject_headers({}, context)
    assert headers["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-01"
    assert headers["tracestate"] == "vendor=value"
    restored = trace.get_current_span(extract_context(headers)).get_span_context()
    assert (restored.trace_id, restored.span_id) == (0x1234, 0x5678)


def test_no_span_means_no_headers() -> None:
    assert inject_headers({}) == {}


@pytest.mark.parametrize("headers", [None, {}, {"other": "x"}])
def test_extract_without_trace_gives_invalid_span(headers: dict[str, str] | None) -> None:
    span = trace.get_current_span(extract_context(headers))
    assert not span.get_span_context().is_valid


def test_batch_processor_exports_on_shutdown(exporter: InMemorySpanExporter) -> None:
    provider = configure_tracing("media", exporter=exporter, set_global=False)
    with tracer("parley.media", provider).start_as_current_span("frame"):
        pass
    provider.shutdown()
    assert [span.name for span in exporter.get_finished_spans()] == ["frame"]


def test_without_an_exporter_spans_carry_ids_but_record_nothing() -> None:
    provider = configure_tracing("brain", set_global=False)
    with tracer("parley.brain", provider).start_as_current_span("turn") as span:
        headers = inject_headers({})
    assert not span.is_recording()
    context = span.get_span_context()
    assert context.is_valid
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert not int(flags, 16) & 1  # not sampled: whoever receives it records nothing either
    assert not records_spans(provider)
    assert not records_spans(trace.NoOpTracerProvider())


def test_with_an_exporter_spans_are_recorded(exporter: InMemorySpanExporter) -> None:
    provider = configure_tracing("brain", exporter=exporter, batch=False, set_global=False)
    with tracer("parley.brain", provider).start_as_current_span("turn") as span:
        assert span.is_recording()
    assert records_spans(provider)
    assert [s.name for s in exporter.get_finished_spans()] == ["turn"]
