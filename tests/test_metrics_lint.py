"""Every metric `Metrics` defines follows Prometheus naming (prefix, base units in names, `_total` on counters)
and has only bounded labels. The bound on label values observed under real traffic is checked where that
traffic runs: tests/e2e/test_prometheus_dashboards.py."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from k2serve.metrics import Metrics

# A name ends with its unit, or for counts with the counted thing (plural).
UNITS = {"seconds", "bytes", "tokens", "requests", "sequences", "blocks", "handoffs", "checkpoints", "resumes",
         "migrations", "calls", "restarts", "reconciles", "deployments", "steps", "groups", "decisions"}
# Dimensionless gauges, each with why it needs no unit suffix.
UNITLESS = {
    "k2serve_queue_depth": "a length (sequences waiting), named like a kernel queue depth",
    "k2serve_worker_group_healthy": "a 0/1 state, like Prometheus' own `up`",
}
# Gauges whose unit comes before a state word (blocks used / blocks free), and ratios (calls per chain).
STATE_SUFFIX = re.compile(r"_(used|free|per_[a-z]+)$")
SCALED_UNITS = re.compile(r"_(ms|us|ns|milliseconds|microseconds|minutes|hours|days|kb|mb|gb|kib|mib|gib|"
                          r"kilobytes|megabytes|percent|pct)(_|$)")
# Labels whose values grow with traffic: any of them makes a series per request or chain.
UNBOUNDED_LABELS = {"request_id", "chain_id", "id", "seq", "seq_id", "sequence_id", "prompt", "text", "token",
                    "user", "api_key", "session", "trace_id", "span_id", "tool_call_id", "message", "path", "url"}
MAX_LABELS = 2


def collectors(metrics: Metrics | CollectorRegistry) -> list[MetricWrapperBase]:
    registry = metrics.registry if isinstance(metrics, Metrics) else metrics
    # prometheus_client keeps label names only on the collector (an untouched labelled metric exposes nothing).
    return list({id(c): c for c in registry._names_to_collectors.values()}.values())


def lint(metric: MetricWrapperBase) -> list[str]:
    """Naming and label problems of one metric; empty when it follows the conventions."""
    name, kind, labels = metric._name, metric._type, set(metric._labelnames)
    problems = []
    if not re.fullmatch(r"k2serve_[a-z][a-z0-9_]*[a-z0-9]", name):
        problems.append(f"{name}: not k2serve_ snake_case")
    if SCALED_UNITS.search(name):
        problems.append(f"{name}: scaled unit; use base units (seconds, bytes)")
    if kind != "counter" and name.endswith("_total"):
        problems.append(f"{name}: only counters end in _total")
    if kind == "histogram" and re.search(r"latency|duration|time|failover", name) and not name.endswith("_seconds"):
        problems.append(f"{name}: a time histogram is in _seconds")
    if name not in UNITLESS and STATE_SUFFIX.sub("", name).rsplit("_", 1)[-1] not in UNITS:
        problems.append(f"{name}: no unit suffix (one of {sorted(UNITS)})")
    if labels & UNBOUNDED_LABELS:
        problems.append(f"{name}: unbounded label(s) {sorted(labels & UNBOUNDED_LABELS)}")
    if len(labels) > MAX_LABELS:
        problems.append(f"{name}: {len(labels)} labels {sorted(labels)}; each multiplies the series count")
    return problems


def test_every_k2serve_metric_follows_the_conventions() -> None:
    metrics = collectors(Metrics())
    assert len(metrics) >= 25
    assert [p for m in metrics for p in lint(m)] == []


def test_counters_are_exposed_with_total() -> None:
    registry = Metrics().registry
    for metric in collectors(registry):
        if metric._type == "counter":
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
            child.inc()
    exposed = {s.name for f in registry.collect() if f.type == "counter" for s in f.samples}
    counters = [m._name for m in collectors(registry) if m._type == "counter"]
    assert {f"{n}_total" for n in counters} <= exposed


def test_lint_names_each_mistake() -> None:
    bad = CollectorRegistry()
    found = {
        "scaled": lint(Histogram("k2serve_ttft_milliseconds", "", registry=bad)),
        "no_unit": lint(Gauge("k2serve_waiting", "", registry=bad)),
        "prefix": lint(Gauge("vllm_num_requests", "", registry=bad)),
        "chain": lint(Counter("k2serve_chain_tokens", "", ["chain_id"], registry=bad)),
        "gauge_total": lint(Gauge("k2serve_blocks_total", "", registry=bad)),
        "time": lint(Histogram("k2serve_ttft_latency", "", registry=bad)),
        "many": lint(Counter("k2serve_x_tokens", "", ["role", "group", "layer"], registry=bad)),
    }
    assert any("scaled unit" in p for p in found["scaled"])
    assert any("no unit suffix" in p for p in found["no_unit"])
    assert any("snake_case" in p for p in found["prefix"])
    assert found["chain"] == ["k2serve_chain_tokens: unbounded label(s) ['chain_id']"]
    assert any("only counters" in p for p in found["gauge_total"])
    assert any("_seconds" in p for p in found["time"])
    assert any("3 labels" in p for p in found["many"])
