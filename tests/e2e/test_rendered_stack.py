"""What `kubectl apply` of a K2Deployment creates, run as a kubelet and KubeRay would run it (tests/kubelet):
the tiny-k2 sample's children, exactly as rendered, converge to Ready pods, serve a streaming chat completion
through the router pod, keep the chain readable, and survive the loss of a worker pod."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from k2serve.operator import pods as names
from k2serve.operator.render import render_children, render_cluster_token
from k2serve.operator.spec import K2DeploymentSpec, K2DeploymentStatus
from k2serve.operator.status import Observed, compute_status
from kubelet.node import Cluster

REPO = Path(__file__).resolve().parents[2]
READY_WITHIN_S = 240.0
MAX_RESTARTS = 1  # a container started before what it needs may fail once; more is a crash loop
# The turn a decode pod dies in: long enough to outlast the kill (delete_pod waits for the kubelet's tick, which
# may be probing slow pods on a loaded machine).
LONG_TOKENS = 256
KILL_AT_CHUNK = 8
STREAM_TIMEOUT_S = 300.0  # a stream is silent while its group is rebuilt on the replacement pod


def _status(cluster: Cluster, name: str, namespace: str, spec: K2DeploymentSpec) -> K2DeploymentStatus:
    """The operator's status, from the objects a cluster would have."""
    observed = Observed(kuberay_installed=True, raycluster=cluster.raycluster_object(names.ray_name(name)),
                        worker_pods=cluster.pod_objects({"ray.io/cluster": names.ray_name(name),
                                                         "ray.io/node-type": "worker"}),
                        router=cluster.deployment_object(names.router_name(name)))
    return compute_status(name, namespace, spec, 1, observed, K2DeploymentStatus())


def _diagnose(cluster: Cluster) -> str:
    out = []
    for pod in cluster.live_pods():
        out.append(f"--- {pod.name} {pod.ip} {json.dumps(pod.status()['containerStatuses'])}")
        for c in pod.containers:
            out.append(f"[{c.spec['name']}]\n{cluster.logs(pod, c.spec['name'], 15)}")
        raylet = pod.dir / "volumes/tmp/ray/session_latest/logs/raylet.out"
        if raylet.exists():
            out.append("[raylet]\n" + "\n".join(raylet.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join(out)


def _wait_ready(cluster: Cluster, name: str, namespace: str, spec: K2DeploymentSpec, timeout_s: float) -> float:
    """Seconds until the K2Deployment is Ready; prints when each pod first was (where the time goes)."""
    start = time.monotonic()
    first_ready: dict[str, float] = {}
    while time.monotonic() - start < timeout_s:
        for pod in cluster.live_pods():
            if pod.is_ready():
                first_ready.setdefault(pod.name, time.monotonic() - start)
        if _status(cluster, name, namespace, spec).phase == "Ready":
            print("pods Ready after (s):", {n: round(t) for n, t in sorted(first_ready.items(), key=lambda i: i[1])})
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"not Ready in {timeout_s}s: {_status(cluster, name, namespace, spec).conditions}\n"
                         + _diagnose(cluster))


def _chat(base: str, content: str, chain: str | None = None, *, max_tokens: int = 16,
          on_chunk: Callable[[int], None] | None = None) -> tuple[str, str, int]:
    """Streams one completion (thinking and answer) in deterministic mode, seeded; (text, chain id, streamed
    chunks). `on_chunk(n)` runs after the n-th chunk that carries text."""
    body = {"model": "tiny-k2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": 11, "deterministic": True, "ignore_eos": True, "stream": True}
    headers = {"X-K2-Chain-Id": chain} if chain else {}
    text, chunks = "", 0
    url = f"{base}/v1/chat/completions"
    with httpx.Client(timeout=STREAM_TIMEOUT_S) as client, client.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        chain_id = r.headers["X-K2-Chain-Id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice.get("delta", {})
                    piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                    text += piece
                    chunks += bool(piece)
                    if piece and on_chunk is not None:
                        on_chunk(chunks)
    return text, chain_id, chunks


def _read_chain(base: str, chain: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/chains/{chain}", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_tiny_sample_serves_as_rendered(tmp_path: Path) -> None:
    cr = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    # Deterministic mode for the whole deployment: an expert-parallel group computes in its own mode (the
    # request's `deterministic` flag does not switch it), and the pod-loss check below compares texts exactly.
    spec = K2DeploymentSpec.model_validate({**cr["spec"], "deterministic": True})
    # What the reconciler creates: the children, and once the internal gRPC token's Secret.
    children = [*render_children(name, namespace, spec, service_monitor=False),
                render_cluster_token(name, namespace, secrets.token_urlsafe(32), secrets.token_urlsafe(32))]
    with Cluster(tmp_path / "node") as cluster:
        cluster.apply(children)
        took = _wait_ready(cluster, name, namespace, spec, READY_WITHIN_S)
        print(f"all pods Ready in {took:.0f}s")
        (router,) = cluster.live_pods(**names.selector(name, "router"))
        base = f"http://{router.ip}:{spec.router.http_port}"
        text, chain, chunks = cluster.in_network(lambda: _chat(base, "hello"))
        assert text and chunks > 1, text
        record = cluster.in_network(lambda: _read_chain(base, chain))
        assert record["chain_id"] == chain and record["n_turns"] == 1
        assert record["turns"][0]["status"] == "finished" and len(record["turns"][0]["generated"]) >= chunks
        restarts = {p.name: {c.spec["name"]: c.restarts for c in p.containers} for p in cluster.live_pods()}
        print("restarts:", restarts)
        assert all(n <= MAX_RESTARTS for pod in restarts.values() for n in pod.values()), restarts

        # A decode worker pod loses every process while a turn streams. The router re-dispatches the turn with
        # the tokens so far; KubeRay's replacement pod (new name, new address) rejoins Ray, the pool controller
        # rebuilds the group on it, and the stream completes with the text of the fault-free run, to the
        # character (deterministic mode). The fault-free run is the same request on the healthy stack.
        start = time.monotonic()
        reference, ref_chain, ref_chunks = cluster.in_network(
            lambda: _chat(base, "tell me more", max_tokens=LONG_TOKENS))
        print(f"fault-free stream of {LONG_TOKENS} tokens took {time.monotonic() - start:.0f}s")
        assert ref_chunks > 2 * KILL_AT_CHUNK, ref_chunks
        decode_pods = cluster.live_pods(**{"ray.io/group": "decode-workers"})
        victim = decode_pods[0]
        killed_at: list[int] = []

        def kill(chunk: int) -> None:
            if chunk == KILL_AT_CHUNK:
                cluster.delete_pod(victim.name)
                killed_at.append(chunk)

        start = time.monotonic()
        text, resumed, chunks = cluster.in_network(
            lambda: _chat(base, "tell me more", max_tokens=LONG_TOKENS, on_chunk=kill))
        print(f"stream with the kill at chunk {KILL_AT_CHUNK} took {time.monotonic() - start:.0f}s")
        assert killed_at == [KILL_AT_CHUNK] and chunks > KILL_AT_CHUNK  # killed mid-stream, streamed on after
        assert text == reference
        migrations = cluster.in_network(lambda: _metric(base, "k2serve_migrations_total"))
        assert migrations >= 1, "the stream never failed over: the kill did not reach it"
        took = _wait_ready(cluster, name, namespace, spec, READY_WITHIN_S)
        replacement = {p.name for p in cluster.live_pods(**{"ray.io/group": "decode-workers"})} - {
            p.name for p in decode_pods}
        assert len(replacement) == 1, replacement
        print(f"replacement {replacement.pop()} Ready {took:.0f}s after the stream ended")
        record = cluster.in_network(lambda: _read_chain(base, resumed))
        assert record["turns"][0]["status"] == "finished" and len(record["turns"][0]["generated"]) == LONG_TOKENS
        assert record["turns"][0]["generated"] == cluster.in_network(
            lambda: _read_chain(base, ref_chain))["turns"][0]["generated"]  # token for token
        # The chain goes on on the rebuilt group.
        _, same_chain, _ = cluster.in_network(lambda: _chat(base, "and then?", chain))
        assert same_chain == chain
        record = cluster.in_network(lambda: _read_chain(base, chain))
        assert record["n_turns"] == 2 and [t["status"] for t in record["turns"]] == ["finished", "finished"]


def _metric(base: str, name: str) -> float:
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return sum(float(line.split()[-1]) for line in r.text.splitlines() if line.startswith(f"{name} "))
