"""A real Prometheus scrapes the real stack under load and evaluates every dashboard panel query through its HTTP
API: each must return data.

Scraped: `k2serve up` as a user starts it (local Ray, the pool controller's group-leader actors — one prefill,
two decode — whose metrics the controller serves merged on one port, the router serving /metrics on its HTTP port)
and the real kopf operator (`--metrics-port`) reconciling the tiny sample in a kmock cluster. The load feeds every
panel:
- concurrent streams sharing a prompt prefix (latency histograms, KV handoffs, prefix-cache hits, expert load);
- a configured `kill_actor` fault on decode-0: the process of its rank — a group of one's leader — dies mid-stream,
  the router re-dispatches to decode-1 (migrations, failover time) and the pool controller replaces the group
  (group restarts);
- a second router process on the same chain store, killed mid-turn by a configured `kill_router` fault; the
  client reconnects to the `up` router (`GET /v1/chains/{id}/stream?from=N`), which takes the turn over
  (chain resumes);
- chat turns on one chain carrying tool-call history (`X-K2-Chain-Id`).
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers.kmock_cluster import running_cluster
from helpers.prometheus import Prometheus, running_prometheus
from helpers.up import Stack, k2serve_up, stop, wait_for_line

from k2serve import dashboards
from k2serve.operator import kube as k
from k2serve.operator.spec import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
TINY_SAMPLE = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
K2D = k.Ref(GROUP, VERSION, PLURAL, "K2Deployment")
WINDOW = "5m"  # $__rate_interval and friends: wide enough to cover the whole run
# Any label with more values than this after a short load is unbounded (K2's 384 experts are the widest domain).
MAX_LABEL_VALUES = 384
SYSTEM = "You are a careful agent. Think step by step, call tools when useful, and report back briefly. " * 2
def _config(path: Path, store: Path, faults: list[dict[str, Any]]) -> Path:
    """Both routers share the chain store and the cluster token (the groups refuse a router without it)."""
    token = store.parent / "cluster-token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(32))
        token.chmod(0o600)
    path.write_text(yaml.safe_dump({"router": {"http_port": 0}, "decode": {"groups": 2},
                                    "chain_store": {"sqlite_path": str(store)}, "faults": faults,
                                    "cluster_token_file": str(token)}))
    return path


def _sse(r: httpx.Response) -> Iterator[tuple[str | None, str]]:
    event_id = None
    for line in r.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]


def _stream_chat(url: str, i: int) -> int:
    """One streamed chat completion; the tokens it generated (from the final usage chunk)."""
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"task {i}"}],
            "max_tokens": 24, "ignore_eos": True, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [data for _, data in _sse(r)]
    assert events[-1] == "[DONE]", events[-3:]
    return int(json.loads(events[-2])["usage"]["completion_tokens"])


def _tool_call_chain(url: str) -> dict[str, Any]:
    """Two turns of one chain; the second carries the first's tool call and its result in the history."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": "What is the weather in Paris?"}]
    first = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=120)
    assert first.status_code == 200, first.text
    chain = first.headers["x-k2-chain-id"]
    call = {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"}]
    second = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4},
                        headers={"X-K2-Chain-Id": chain}, timeout=120)
    assert second.status_code == 200, second.text
    return dict(httpx.get(f"{url}/v1/chains/{chain}").json())


def _resume_after_router_death(stack: Stack, config: Path, workdir: Path) -> list[int]:
    """A turn begun on a second router that a configured fault kills mid-stream, finished by the `up` router
    for the client that reconnects there; returns the token indices the client saw across both."""
    log = workdir / "router2.log"
    args = [sys.executable, "-m", "k2serve.router.process", "--config", str(config)]
    for group in stack.groups:
        args += ["--group", group]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        url2 = wait_for_line(proc, log, r"HTTP (http://\S+)/v1", 60).group(1)
        body = {"messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 24, "ignore_eos": True,
                "stream": True}
        seen: list[str] = []
        with pytest.raises(httpx.HTTPError):  # the router dies mid-stream
            with httpx.stream("POST", f"{url2}/v1/chat/completions", json=body, timeout=60) as r:
                for event_id, _ in _sse(r):
                    seen.append(event_id or "")
        proc.wait(10)
    finally:
        stop(proc, signal.SIGKILL)
    seen = [e for e in seen if e]  # the role chunk and [DONE] carry no id
    chain, last = seen[-1].rsplit(":", 1)
    with httpx.stream("GET", f"{stack.url}/v1/chains/{chain}/stream", params={"from": int(last) + 1},
                      timeout=60) as r:
        rest = [json.loads(data)["index"] for _, data in _sse(r) if data != "[DONE]"]
    # A chat event carries the text of every token since the previous event (a token whose bytes end mid
    # character or mid special marker has none of its own), so its ids may skip; the chain stream sends every
    # token. Together: the client holds tokens 0..last from router 2 and last+1.. from the `up` router.
    first = [int(e.rsplit(":", 1)[1]) for e in seen]
    assert first == sorted(set(first)), first
    return list(range(first[-1] + 1)) + rest


def concrete(expr: str) -> str:
    """A query as Grafana sends it with every variable set to All."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", WINDOW, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def _has_data(prom: Prometheus, expr: str) -> bool:
    return any(s["value"][1] not in ("NaN", "+Inf", "-Inf") for s in prom.query(concrete(expr)))


def test_every_dashboard_panel_has_data_from_the_real_stack(tmp_path: Path) -> None:
    store = tmp_path / "chains.sqlite3"
    up_config = _config(tmp_path / "up.yaml", store,
                        [{"kind": "kill_actor", "pool": "decode", "group": 0, "after_tokens": 30}])
    router2_config = _config(tmp_path / "router2.yaml", store, [{"kind": "kill_router", "after_tokens": 5}])
    (tmp_path / "kube").mkdir()
    with ExitStack() as stack:
        up = stack.enter_context(k2serve_up(up_config, tmp_path))
        cluster = stack.enter_context(running_cluster(True, tmp_path / "kube"))
        prom = stack.enter_context(running_prometheus(
            {"k2serve-router": [up.url.removeprefix("http://")], "k2serve-groups": [up.metrics],
             "k2serve-operator": [f"127.0.0.1:{cluster.metrics_port}"]}, tmp_path / "prom"))
        # Histograms and counters must be scraped before they move, or their rate shows nothing.
        prom.wait_for_scrapes(2)

        namespace = TINY_SAMPLE["metadata"]["namespace"]
        cluster.kube._call("POST", K2D.path(namespace), body=TINY_SAMPLE)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(_stream_chat, [up.url] * 8, range(8))) == [24] * 8
        chain = _tool_call_chain(up.url)
        assert [c["id"] for c in chain["tool_calls"]] == ["call_0"] and chain["tool_calls"][0]["result"]
        assert _resume_after_router_death(up, router2_config, tmp_path) == list(range(24))
        assert cluster.kube.get(K2D, namespace, TINY_SAMPLE["metadata"]["name"])["status"]["phase"]
        prom.wait_for_scrape_after(time.time() + 1)

        docs = {name: json.loads(text) for name, text in dashboards.render().items()}
        queries = [q for name, doc in docs.items() for q in dashboards.panel_queries(name, doc)]
        empty = [f"{q.dashboard} / {q.panel}: {concrete(q.expr)}" for q in queries if not _has_data(prom, q.expr)]
        assert empty == [], "panels without data:\n" + "\n".join(empty)

        variables = [(v["name"], v["query"]) for doc in docs.values() for v in doc["templating"]["list"]
                     if v["type"] == "query"]
        for name, query in variables:
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
            assert prom.label_values(label, concrete(selector)), f"variable {name}: {query} lists nothing"

        heat = prom.query(concrete(next(q.expr for q in queries if q.panel.startswith("Expert load"))))
        assert len(heat) >= 8, heat  # tiny-k2 routes to 16 experts: a short load reaches most of them

        values: dict[tuple[str, str], set[str]] = {}
        for s in prom.series('{__name__=~"k2serve_.+"}'):
            for label, value in s.items():
                if label not in ("__name__", "instance", "job", "le"):
                    values.setdefault((s["__name__"], label), set()).add(value)
        wide = {key: len(v) for key, v in values.items() if len(v) > MAX_LABEL_VALUES}
        assert wide == {}


@pytest.mark.parametrize("expr", ['sum(rate(k2serve_requests_total{role=~"$role"}[$__rate_interval]))'])
def test_concrete_substitutes_every_variable(expr: str) -> None:
    assert concrete(expr) == 'sum(rate(k2serve_requests_total{role=~".*"}[5m]))'
