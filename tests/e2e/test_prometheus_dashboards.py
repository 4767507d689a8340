"""A real Prometheus scrapes k2serve under load and evaluates every dashboard panel query through its HTTP API.

The local stack (`k2serve up`: router with /metrics on its HTTP port, worker-group leaders via `Metrics.serve`)
is still being assembled, so the scraped process is a worker-group stand-in: a real `Engine` on builtin:tiny-k2
serving continuous batches, whose own counters (queue, running, KV blocks, prefill/decode/prefix-hit tokens,
the model's per-(layer, expert) routing counts) are published on a `Metrics` registry after every step. Panels
whose metrics only the router, chain checkpointer or operator emit are listed in .notes/dashboards.md; this test
requires data from every panel the worker side feeds and checks label cardinality on what was scraped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers.prometheus import Prometheus, running_prometheus
from helpers.tiny import tiny_engine

from k2serve import dashboards
from k2serve.metrics import Metrics
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.sampling import SamplingParams

WINDOW = "5m"  # $__rate_interval and friends: wide enough to cover the whole load
# What the worker side exports today (the engine's own counters); the rest needs router/chains/operator wiring.
WORKER_SERIES = {"k2serve_queue_depth", "k2serve_running_sequences", "k2serve_kv_blocks_used",
                 "k2serve_kv_blocks_free", "k2serve_prefill_tokens_total", "k2serve_decode_tokens_total",
                 "k2serve_prefix_cache_hit_tokens_total", "k2serve_expert_tokens_total"}
# Any label with more values than this after a short load is unbounded (K2's 384 experts are the widest domain).
MAX_LABEL_VALUES = 384


def concrete(expr: str) -> str:
    """A panel query as Grafana would send it with every variable set to All."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", WINDOW, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def publish(engine: Engine, metrics: Metrics, last: dict[str, int], role: str = "decode", group: str = "0") -> None:
    """Copies the engine's counters onto the registry, as a group leader does after each step."""
    g = {"role": role, "group": group}
    metrics.queue_depth.labels(**g).set(len(engine.waiting))
    metrics.running.labels(**g).set(len(engine.running))
    metrics.kv_blocks_used.labels(**g).set(engine.blocks.num_used_blocks)
    metrics.kv_blocks_free.labels(**g).set(engine.blocks.num_free_blocks)
    for counter, now in ((metrics.prefill_tokens, engine.stats.prefill_tokens),
                         (metrics.decode_tokens, engine.stats.decode_tokens),
                         (metrics.prefix_hit_tokens, engine.blocks.prefix_hit_tokens)):
        counter.labels(**g).inc(now - last.get(counter._name, 0))
        last[counter._name] = now
    load = engine.model.expert_load  # counts [num_moe_layers, E]
    counts = load.take()
    for layer, row in load.layer_index.items():
        for expert, tokens in enumerate(counts[row].tolist()):
            metrics.expert_tokens.labels(layer=str(layer), expert=str(expert)).inc(tokens)


def run_load(engine: Engine, metrics: Metrics, seconds: float) -> int:
    """Waves of requests sharing a prefix until `seconds` pass; returns the tokens generated."""
    last: dict[str, int] = {}
    generated, wave, deadline = 0, 0, time.monotonic() + seconds
    params = SamplingParams(max_tokens=12, temperature=0.8)
    while time.monotonic() < deadline:
        for i in range(4):
            engine.add_request(f"w{wave}-{i}", [7, 8, 9, 10] * 8 + [wave, i], params)
        while engine.has_work():
            generated += len(engine.step())
            publish(engine, metrics, last)
        wave += 1
    return generated


def _nonempty(prom: Prometheus, expr: str) -> bool:
    return any(s["value"][1] not in ("NaN", "+Inf", "-Inf") for s in prom.query(concrete(expr)))


def test_prometheus_evaluates_worker_panels_with_data(tmp_path: Path) -> None:
    metrics = Metrics()
    port = metrics.serve(0)
    engine = tiny_engine()
    with running_prometheus({"k2serve-worker": [f"127.0.0.1:{port}"]}, tmp_path / "prom") as prom:
        prom.wait_for_scrapes(1)
        assert run_load(engine, metrics, seconds=4.0) > 0
        prom.wait_for_scrapes(7)

        docs = {name: json.loads(text) for name, text in dashboards.render().items()}
        queries = [q for name, doc in docs.items() for q in dashboards.panel_queries(name, doc)]
        fed = [q for q in queries if dashboards.referenced_metrics(q.expr) <= WORKER_SERIES]
        assert len(fed) == 11
        empty = [f"{q.dashboard} / {q.panel}: {concrete(q.expr)}" for q in fed if not _nonempty(prom, q.expr)]
        assert empty == []
        # Every query, fed or not, is valid PromQL (an error raises inside query()).
        for q in queries:
            prom.query(concrete(q.expr))

        heat = prom.query(concrete(next(q.expr for q in queries if q.panel.startswith("Expert load"))))
        assert len(heat) == engine.model.config.n_routed_experts

        series = prom.series('{__name__=~"k2serve_.+"}')
        values: dict[tuple[str, str], set[str]] = {}
        for s in series:
            for label, value in s.items():
                if label not in ("__name__", "instance", "job", "le"):
                    values.setdefault((s["__name__"], label), set()).add(value)
        assert values, "nothing scraped"
        wide = {k: len(v) for k, v in values.items() if len(v) > MAX_LABEL_VALUES}
        assert wide == {}


@pytest.mark.parametrize("expr", ['sum(rate(k2serve_requests_total{role=~"$role"}[$__rate_interval]))'])
def test_concrete_substitutes_every_variable(expr: str) -> None:
    assert concrete(expr) == 'sum(rate(k2serve_requests_total{role=~".*"}[5m]))'
