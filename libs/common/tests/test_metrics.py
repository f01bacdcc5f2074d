from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from parley.common.metrics import Metrics, render


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics("gateway"), Metrics("gateway")
    first.counter("calls", "Calls handled").inc()
    second.counter("calls", "Calls handled")  # no "Duplicated timeseries" error
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("parley_calls_total") == 1.0
    assert second.registry.get_sample_value("parley_calls_total") == 0.0


def test_counter_gauge_histogram_with_labels() -> None:
    metrics = Metrics("media", namespace="test")
    metrics.counter("frames", "Audio frames", ["direction"]).labels(direction="in").inc(3)
    metrics.gauge("active_calls", "Calls in progress").set(2)
    metrics.histogram("stt_latency_seconds", "STT latency", buckets=(0.1, 1.0)).observe(0.5)
    registry = metrics.registry
    assert registry.get_sample_value("test_frames_total", {"direction": "in"}) == 3.0
    assert registry.get_sample_value("test_active_calls") == 2.0
    assert registry.get_sample_value("test_stt_latency_seconds_bucket", {"le": "0.1"}) == 0.0
    assert registry.get_sample_value("test_stt_latency_seconds_bucket", {"le": "1.0"}) == 1.0


def test_same_name_returns_the_same_metric() -> None:
    metrics = Metrics("brain")
    assert metrics.counter("turns", "Turns") is metrics.counter("turns", "Turns")


def test_same_name_with_another_kind_or_labels_is_an_error() -> None:
    metrics = Metrics("brain")
    metrics.counter("turns", "Turns", ["agent"])
    with pytest.raises(ValueError, match="already exists as a Counter"):
        metrics.gauge("turns", "Turns", ["agent"])
    with pytest.raises(ValueError, match="with labels"):
        metrics.counter("turns", "Turns", ["org"])


def test_injected_registry_is_used() -> None:
    registry = CollectorRegistry()
    Metrics("billing", registry=registry).gauge("queue_depth", "Depth").set(4)
    assert registry.get_sample_value("parley_queue_depth") == 4.0


def test_render_returns_text_exposition() -> None:
    metrics = Metrics("tools")
    metrics.counter("tool_calls", "Tool calls").inc()
    body, content_type = render(metrics.registry)
    assert content_type.startswith("text/plain")
    assert b"# HELP parley_tool_calls_total Tool calls" in body
    assert b"parley_tool_calls_total 1.0" in body


def test_a_loop_histogram_exposes_what_prometheus_clients_histogram_would() -> None:
    buckets = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.5)
    values = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.003, 0.0075, 0.2, 0.5, 0.9, 7.0]
    fast, reference = Metrics("media", namespace="a"), Metrics("media", namespace="a")
    loop = fast.loop_histogram("frame_delay_seconds", "Delay", buckets)
    standard = reference.histogram("frame_delay_seconds", "Delay", buckets=buckets)
    for value in values:
        loop.observe(value)
        standard.observe(value)

    def samples(registry: CollectorRegistry) -> list[str]:
        return [line for line in render(registry)[0].decode().splitlines()
                if "_created" not in line]

    assert samples(fast.registry) == samples(reference.registry)
    assert fast.registry.get_sample_value("a_frame_delay_seconds_bucket", {"le": "0.0005"}) == 3
    assert fast.registry.get_sample_value("a_frame_delay_seconds_count") == len(values)
    with pytest.raises(ValueError, match="already exists"):
        fast.loop_histogram("frame_delay_seconds", "Delay", buckets)


def test_a_loop_counter_exposes_what_prometheus_clients_counter_would() -> None:
    fast, reference = Metrics("gateway", namespace="a"), Metrics("gateway", namespace="a")
    loop = fast.loop_counter("frames", "Frames relayed", ["protocol", "direction"])
    standard = reference.counter("frames", "Frames relayed", ["protocol", "direction"])
    for protocol, direction, times in (("twilio", "in", 3), ("twilio", "out", 1),
                                       ("plivo", "in", 2)):
        for _ in range(times):
            loop.labels(protocol, direction).inc()
            standard.labels(protocol, direction).inc()
    loop.labels("plivo", "out")  # asked for, never counted: exposed as 0, as prometheus does
    standard.labels("plivo", "out")

    def samples(registry: CollectorRegistry) -> list[str]:
        return [line for line in render(registry)[0].decode().splitlines()
                if "_created" not in line]

    assert samples(fast.registry) == samples(reference.registry)
    assert fast.registry.get_sample_value(
        "a_frames_total", {"protocol": "twilio", "direction": "in"}) == 3
    # Asked for again (every socket asks): the same counter, still counting.
    assert fast.loop_counter("frames", "Frames relayed", ["protocol", "direction"]) is loop
    with pytest.raises(ValueError, match="already exists"):
        fast.loop_counter("frames", "Frames relayed", ["protocol"])
    with pytest.raises(ValueError, match="already exists"):
        fast.counter("frames", "Frames relayed", ["protocol", "direction"])
    with pytest.raises(ValueError, match="labels"):
        loop.labels("twilio")
