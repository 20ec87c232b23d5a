"""The OpenTelemetry SDK's in-memory metric reader wired to ``agw_persist_cache._otel``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agw_persist_cache import _otel


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _otel.reset()
    assert _otel.enable(provider)
    yield reader
    _otel.reset()
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """metric name -> [(attributes, value or histogram count)] of our meter."""
    found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != _otel.METER_NAME:
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # a histogram
                    found.setdefault(metric.name, []).append((dict(point.attributes), value))
    return found


def value(found: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **attrs: str) -> Any:
    matches = [v for a, v in found.get(name, []) if a == attrs]
    assert len(matches) <= 1, (name, attrs, found.get(name))
    return matches[0] if matches else 0
