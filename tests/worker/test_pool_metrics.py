"""The pool controller's merged metrics: several leaders' expositions become one valid exposition, every
sample labelled with its leader, so series that carry no group label (expert load) cannot collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from k2serve.metrics import Metrics
from k2serve.worker.parallel.pool_metrics import MergedGroupMetrics


def leader_text(group_id: str, role: str, running: int) -> str:
    m = Metrics()
    m.running.labels(role=role, group=group_id).set(running)
    m.expert_tokens.labels(layer="1", expert="2").inc(5)
    m.failover_seconds.observe(0.3)  # a histogram: buckets, sum and count all carry the label
    return generate_latest(m.registry).decode()


def merged(texts: dict[str, str]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedGroupMetrics(lambda: texts))
    return generate_latest(registry).decode()


def test_leaders_merge_into_one_exposition_labelled_by_leader() -> None:
    out = merged({"decode-0": leader_text("decode-0", "decode", 3),
                  "prefill-0": leader_text("prefill-0", "prefill", 5)})
    families = {f.name: f for f in text_string_to_metric_families(out)}
    running = {s.labels["leader"]: s.value for s in families["k2serve_running_sequences"].samples}
    assert running == {"decode-0": 3.0, "prefill-0": 5.0}
    experts = [s for s in families["k2serve_expert_tokens"].samples if s.name.endswith("_total")]
    assert sorted(s.labels["leader"] for s in experts) == ["decode-0", "prefill-0"]
    hist = families["k2serve_failover_seconds"]
    assert hist.type == "histogram" and {s.labels["leader"] for s in hist.samples} == {"decode-0", "prefill-0"}
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples]
    assert len(series) == len(set(series))  # no duplicate series: Prometheus would reject the scrape


def test_no_leaders_is_an_empty_exposition() -> None:
    assert merged({}) == ""
