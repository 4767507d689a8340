"""What `kubectl apply` of a K2Deployment creates, run as a kubelet and KubeRay would run it (tests/kubelet):
the tiny-k2 sample's children, exactly as rendered, converge to Ready pods, serve a streaming chat completion
through the router pod, keep the chain readable, and survive the loss of a worker pod."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from k2serve.operator import pods as names
from k2serve.operator.render import render_children, render_cluster_token
from k2serve.operator.spec import K2DeploymentSpec, K2DeploymentStatus
from k2serve.operator.status import Observed, compute_status
from kubelet.node import Cluster

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
READY_WITHIN_S = 240.0
MAX_RESTARTS = 1  # a container started before what it needs may fail once; more is a crash loop
REJOIN_WITHIN_S = 180.0  # after the pods are Ready again, until the rebuilt group serves


def _retry(fn: Callable[[], T], timeout_s: float) -> T:
    """`fn()` until it stops raising (the group is rebuilt after its pods are Ready), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)

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
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if _status(cluster, name, namespace, spec).phase == "Ready":
            return time.monotonic() - start
        time.sleep(1)
    raise AssertionError(f"not Ready in {timeout_s}s: {_status(cluster, name, namespace, spec).conditions}\n"
                         + _diagnose(cluster))


def _chat(base: str, content: str, chain: str | None = None) -> tuple[str, str, int]:
    """Streams one greedy completion (thinking and answer); (text, chain id, streamed chunks)."""
    body = {"model": "tiny-k2", "messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    headers = {"X-K2-Chain-Id": chain} if chain else {}
    text, chunks = "", 0
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{base}/v1/chat/completions", json=body,
                                                            headers=headers) as r:
        assert r.status_code == 200, r.read()
        chain_id = r.headers["X-K2-Chain-Id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice.get("delta", {})
                    piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                    text += piece
                    chunks += bool(piece)
    return text, chain_id, chunks


def _read_chain(base: str, chain: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/chains/{chain}", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_tiny_sample_serves_as_rendered(tmp_path: Path) -> None:
    cr = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    spec = K2DeploymentSpec.model_validate(cr["spec"])
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

        # A decode worker pod loses every process; KubeRay's replacement (new name, new address) rejoins, the pool
        # controller rebuilds the group on it, and the stack serves the same greedy text and resumes the chain.
        victim = cluster.live_pods(**{"ray.io/group": "decode-workers"})[0]
        cluster.delete_pod(victim.name)
        assert _status(cluster, name, namespace, spec).phase != "Ready"
        took = _wait_ready(cluster, name, namespace, spec, READY_WITHIN_S)
        replacement = {p.name for p in cluster.live_pods(**{"ray.io/group": "decode-workers"})} - {victim.name}
        print(f"replacement {sorted(replacement)} Ready in {took:.0f}s")

        def served_again() -> dict[str, Any]:
            _, again, _ = _chat(base, "hello")
            turn = _read_chain(base, again)["turns"][0]
            assert turn["status"] == "finished", turn["status"]
            return dict(turn)

        turn = cluster.in_network(lambda: _retry(served_again, REJOIN_WITHIN_S))
        first = record["turns"][0]
        assert (turn["generated"], turn["finish_reason"]) == (first["generated"], first["finish_reason"])
        _, same_chain, _ = cluster.in_network(lambda: _chat(base, "and then?", chain))
        assert same_chain == chain
        record = cluster.in_network(lambda: _read_chain(base, chain))
        assert record["n_turns"] == 2 and [t["status"] for t in record["turns"]] == ["finished", "finished"]
