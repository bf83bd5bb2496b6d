"""What both daemons' Prometheus metrics share: a registry of their own (never the
library's global one), process and host memory, build info, the latency buckets, and
the text exposition. Names and labels are listed in docs/monitoring.md; labels are low
cardinality by rule: outcomes, status codes, states, node ids (bounded by the fleet),
never request ids or anything a caller wrote.
"""

from __future__ import annotations

import platform
from typing import Iterable

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

# Seconds. A clinical note is 400-600 tokens: first token within a second or two, ~20-60
# ms per token on a Mac Studio, 10-60 s end to end; the tails reach the 120 s first-token
# timeout and the queue's 10 s limit.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
    600.0,
)

# The classic text format every Prometheus 2.x reads (the library's newest, 1.0.0, is not).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
disable_created_metrics()  # no *_created series: they double every counter's series count


QUALITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


class NoteMetrics:
    """Completed notes' schema checks and quality scores, by output format: a note template
    name, or "json_schema" for any caller's schema (never the schema: unbounded labels)."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        self.notes = Counter(
            f"{prefix}_notes",
            "Completed notes by output format and whether they satisfied it (valid true/false).",
            ["format", "valid"],
            registry=registry,
        )
        self.quality = Histogram(
            f"{prefix}_note_quality",
            "Weighted quality score of completed notes (0..1).",
            ["format"],
            buckets=QUALITY_BUCKETS,
            registry=registry,
        )
        self.parts = Counter(
            f"{prefix}_note_subscore_sum",
            "Sum of each quality sub-score over completed notes; "
            f"divide by {prefix}_notes_total for the mean.",
            ["format", "part"],
            registry=registry,
        )

    def observe(
        self, output_format: str, valid: bool, total: float, parts: dict[str, float]
    ) -> None:
        fmt = "json_schema" if output_format.startswith("json_schema:") else output_format
        self.notes.labels(fmt, "true" if valid else "false").inc()
        self.quality.labels(fmt).observe(total)
        for name, score in parts.items():
            self.parts.labels(fmt, name).inc(score)


class HostCollector(Collector):
    """The host's memory at scrape time (a Mac Studio's unified memory is the model's too)."""

    def collect(self) -> Iterable[Metric]:
        vm = psutil.virtual_memory()
        g = GaugeMetricFamily(
            "studiofleet_host_memory_bytes",
            "Host memory, by kind (total, available, used).",
            labels=["kind"],
        )
        for kind in ("total", "available", "used"):
            g.add_metric([kind], float(getattr(vm, kind)))
        yield g


class InfoCollector(Collector):
    """studiofleet_build_info: one series with the role, daemon id and versions, value 1."""

    def __init__(self, role: str, ident: str):
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("studiofleet")
        except PackageNotFoundError:
            ours = "dev"
        self._labels = {
            "role": role,
            "id": ident,
            "version": ours,
            "python": platform.python_version(),
        }

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "studiofleet_build_info",
            "The daemon: role, id and versions (value 1).",
            labels=list(self._labels),
        )
        g.add_metric(list(self._labels.values()), 1.0)
        yield g


def new_registry(role: str, ident: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(HostCollector())
    registry.register(InfoCollector(role, ident))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """A /metrics page as {(sample name, frozenset of label pairs): value}, read with
    prometheus_client's own parser (the demo and the tests read scrapes this way)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0..1) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def state_family(
    name: str,
    help_: str,
    label: str,
    states: Iterable[str],
    current: str,
    extra: dict[str, str] | None = None,
) -> GaugeMetricFamily:
    """An enum as Prometheus likes it: one series per possible state, 1 for the current."""
    extra = extra or {}
    g = GaugeMetricFamily(name, help_, labels=[*extra, label])
    for state in states:
        g.add_metric([*extra.values(), state], 1.0 if state == current else 0.0)
    return g
