"""A kmock Kubernetes emulator on a loopback port (own thread, own event loop) with the real kopf operator
running against it (another thread, its metrics served on a free port), and a synchronous kubernetes client
for the test body. Used by tests/operator and by the dashboards e2e test.

kmock 0.8 lacks three things a real API server does that kopf and the kubernetes client need; the subclass
adds exactly those: metadata.uid / resourceVersion / generation on writes, and serving a custom resource
once its CRD is created.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from helpers.prometheus import free_port

from k2serve.operator import run
from k2serve.operator.kube import Kube

REPO = Path(__file__).resolve().parents[2]
KOPF_PEERING_CRDS = REPO / "charts/k2serve/crds/kopf-peering.yaml"
K2_CRD = REPO / "charts/k2serve/crds/k2deployments.yaml"
TEST_AGENT = "k2serve-tests"
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"

# Enough of KubeRay's own CRD for discovery (names and scope); KubeRay ships the full schema.
RAYCLUSTER_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayclusters.ray.io"},
    "spec": {"group": "ray.io", "scope": "Namespaced",
             "names": {"kind": "RayCluster", "plural": "rayclusters", "singular": "raycluster"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "subresources": {"status": {}}}]},
}


# Built-in resources every API server serves (kmock serves only what is declared or already has objects).
BUILTINS = {
    "v1/namespaces": ("Namespace", False), "v1/events": ("Event", True), "v1/pods": ("Pod", True),
    "v1/configmaps": ("ConfigMap", True), "v1/services": ("Service", True), "v1/secrets": ("Secret", True),
    "apps/v1/deployments": ("Deployment", True), "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
    "batch/v1/jobs": ("Job", True), "v1/serviceaccounts": ("ServiceAccount", True),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
}
VERBS = ["get", "list", "watch", "create", "patch", "delete"]


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus uid/resourceVersion/generation and CRD-driven resource serving."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.versions = itertools.count(1)
        for resource, (kind, namespaced) in BUILTINS.items():
            self.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                          subresources=["status"])

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None and request.action in (kmock.action.CREATE,
                                                                                      kmock.action.UPDATE):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self.versions))
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                if "name" not in meta and "generateName" in meta:
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                if str(request.resource) == str(kmock.resource(CRD_RESOURCE)) or data.get("kind") == \
                        "CustomResourceDefinition":
                    self._serve_crd(data)
            elif "spec" in data and request.subresource is None:
                self._bump_generation(request)
        return await super()._handle(request)

    def _bump_generation(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects:
            current = self.objects[key].get("metadata", {}).get("generation", 1)
            request.data["metadata"]["generation"] = current + 1

    def _serve_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            self.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = kmock.ResourceInfo(
                kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
                namespaced=spec["scope"] == "Namespaced", shortnames=spec["names"].get("shortNames", []),
                verbs=VERBS,
                subresources=list(version.get("subresources", {})),
            )


@dataclass
class Cluster:
    emulator: Emulator
    kube: Kube
    loop: asyncio.AbstractEventLoop
    metrics_port: int = 0  # the operator's /metrics

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def apply_crd(self, crd: dict[str, Any]) -> None:
        self.kube._call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd)

    def requests(self) -> list[kmock.Request]:
        return list(self.emulator)


def _serve(started: threading.Event, box: dict[str, Any]) -> None:
    async def main() -> None:
        box["stop"] = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            box.update(emulator=emulator, port=server.port, loop=asyncio.get_running_loop())
            started.set()
            await box["stop"].wait()

    asyncio.run(main())


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "test", "user": {"token": "kmock-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
    }))
    return path


@contextmanager
def running_emulator(workdir: Path) -> Iterator[tuple[Cluster, Path, dict[str, Any]]]:
    """Just the emulator, with a kubeconfig for it, until the block exits: (cluster, kubeconfig, server box)."""
    started, box = threading.Event(), {}
    server = threading.Thread(target=_serve, args=(started, box), daemon=True)
    server.start()
    assert started.wait(10), "kmock did not start"
    config = _kubeconfig(workdir / "config", box["port"])
    kube = Kube.from_environment(str(config))
    kube.api.user_agent = TEST_AGENT  # so RBAC accounting can tell the test's calls from the operator's
    try:
        yield Cluster(emulator=box["emulator"], kube=kube, loop=box["loop"], metrics_port=free_port()), config, box
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        server.join(10)


@contextmanager
def running_cluster(kuberay: bool, workdir: Path, namespaces: tuple[str, ...] = (),
                    operator_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """An emulator (with or without KubeRay's CRD) and the operator (`--metrics-port`, plus `operator_args`)
    against it until the block exits; with `namespaces`, the operator watches only those (`--namespace`)."""
    with running_emulator(workdir) as (cluster, config, box):
        cluster.apply_crd(yaml.safe_load(K2_CRD.read_text()))
        for crd in yaml.safe_load_all(KOPF_PEERING_CRDS.read_text()):
            cluster.apply_crd(crd)
        if kuberay:
            cluster.apply_crd(RAYCLUSTER_CRD)
        # The chart creates these peering objects; kopf pauses until they exist.
        if not namespaces:
            cluster.kube._call("POST", "/apis/kopf.dev/v1/clusterkopfpeerings", body={
                "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": run.PEERING_NAME}})
        for ns in namespaces:
            cluster.kube._call("POST", f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings", body={
                "apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                "metadata": {"name": run.PEERING_NAME, "namespace": ns}})

        with pytest.MonkeyPatch.context() as monkeypatch:
            # kopf's login reads $KUBECONFIG whenever it (re-)authenticates.
            monkeypatch.setenv("KUBECONFIG", str(config))
            args = run.parse(["--kubeconfig", str(config), "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
                              "--resync-seconds", "0.5", "--metrics-port", str(cluster.metrics_port),
                              *(a for ns in namespaces for a in ("--namespace", ns)), *operator_args])
            ready, stop = threading.Event(), threading.Event()
            operator = threading.Thread(target=lambda: asyncio.run(run.operate(args, stop=stop, ready=ready)),
                                        daemon=True)
            operator.start()
            assert ready.wait(20), "kopf did not become ready"
            try:
                yield cluster
            finally:
                stop.set()
                operator.join(15)
    assert not operator.is_alive(), "kopf did not stop"


OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")  # the operator's clients (kopf, kubernetes): their calls need RBAC


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def request_verb(request: kmock.Request) -> str:
    """The RBAC verb of a recorded request."""
    if request.method == kmock.method.GET:
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[request.method.value]
