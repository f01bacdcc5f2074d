"""Prometheus metrics on a per-service registry.

Each service builds one :class:`Metrics` in its composition root and passes it to whatever
records measurements. A private ``CollectorRegistry`` (rather than prometheus_client's global one)
lets tests build as many services as they like in one process without name clashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["Metrics", "render"]

_MetricT = TypeVar("_MetricT", bound=MetricWrapperBase)


class Metrics:
    """Factory for a service's counters, histograms and gauges, all on one registry.

    Asking twice for the same name returns the existing metric, so independent components can
    share e.g. ``events_published_total`` without coordinating who creates it.
    """

    def __init__(
        self, service: str, *, namespace: str = "parley", registry: CollectorRegistry | None = None
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.registry = CollectorRegistry() if registry is None else registry
        self._metrics: dict[str, tuple[MetricWrapperBase, tuple[str, ...]]] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """Return the counter ``<namespace>_<name>`` (``_total`` is added by the exposition)."""
        return self._get(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Return the gauge ``<namespace>_<name>``."""
        return self._get(Gauge, name, documentation, labelnames)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> Histogram:
        """Return the histogram ``<namespace>_<name>``; buckets default to seconds scale."""
        return self._get(Histogram, name, documentation, labelnames, buckets=buckets)

    def _get(
        self,
        kind: type[_MetricT],
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        **options: Any,
    ) -> _MetricT:
        labels = tuple(labelnames)
        if name not in self._metrics:
            metric = kind(
                name,
                documentation,
                labelnames=labels,
                namespace=self.namespace,
                registry=self.registry,
                **options,
            )
            self._metrics[name] = (metric, labels)
        existing, existing_labels = self._metrics[name]
        if not isinstance(existing, kind) or existing_labels != labels:
            raise ValueError(
                f"metric {name!r} already exists as a {type(existing).__name__}"
                f" with labels {existing_labels}"
            )
        return existing


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Return the registry's samples in Prometheus text format and the matching content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
