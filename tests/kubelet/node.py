"""A one-machine stand-in for a Kubernetes node and the controllers above it, for the operator's rendered
children: ReplicaSets of Deployments and KubeRay's RayCluster pods are created (and re-created when deleted),
each pod gets a network namespace of its own with one address 127.0.0.X (network.py), Service names
resolve to their pods' addresses through each pod's hosts file, and the kubelet's part is played per pod:
init containers in order, then every container at once, restartPolicy with exponential back-off, and
readiness and liveness probes. Pod and workload status are kept in the Kubernetes shape, so the operator's
status code reads them as it reads the API server's.

Deliberate differences from a cluster (docs/kube-harness.md): Services resolve to a pod address rather than a
virtual IP (Service port must equal the target port), containers get SIGKILL without a grace period, and exec
probes, PVCs and added capabilities are not modelled (they raise).
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubelet import kuberay
from kubelet.lifecycle import Kubelet
from kubelet.network import Endpoint, Network
from kubelet.pods import Container, Pod, selects

T = TypeVar("T")


class Cluster:
    """Use as a context manager; `apply(children)` then `wait_ready`. Every method is thread-safe."""

    def __init__(self, workdir: Path, *, secrets: dict[str, dict[str, str]] | None = None,
                 first_ip: int = 10, tick_s: float = 0.5) -> None:
        self.dir = workdir
        self.secrets = secrets or {}
        self.objects: list[dict[str, Any]] = []
        self.pods: list[Pod] = []
        self._next_ip = first_ip
        self._tick_s = tick_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._net: Network | None = None
        self._client: Endpoint | None = None
        self._kubelet = Kubelet(self.secrets, self._hosts_file, self.in_network)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self._net = Network()
        try:
            # Where the kubelet's probes and the tests' clients connect from, as from another node.
            self._client = self._net.attach(f"127.0.0.{self._next_ip - 1}")
        except BaseException:
            self._net.close()
            raise
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            for pod in self.pods:
                self._kubelet.kill_pod(pod)
        if self._net is not None:
            self._net.close()

    @property
    def netns(self) -> str:
        """The clients' network namespace (`in_network`)."""
        assert self._client is not None
        return self._client.netns

    def in_network(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on a thread inside the clients' network namespace, from where every pod address is reachable."""
        import ctypes

        result: list[T] = []
        errors: list[BaseException] = []

        def target() -> None:
            fd = os.open(self.netns, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
                result.append(fn())
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)
            finally:
                os.close(fd)

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if errors:
            raise errors[0]
        return result[0]

    # ---- objects ----------------------------------------------------------------------------------
    def apply(self, children: list[dict[str, Any]]) -> None:
        """Takes the operator's children; every workload's pods start at once (no ordering between them)."""
        with self._lock:
            for child in children:
                if child["kind"] == "Secret":  # kept decoded, as the kubelet writes them into volumes and env
                    data = {k: base64.b64decode(v).decode() for k, v in child.get("data", {}).items()}
                    self.secrets[child["metadata"]["name"]] = {**data, **child.get("stringData", {})}
                    continue
                self.objects.append(copy.deepcopy(child))
                if child["kind"] == "RayCluster":
                    self.objects.append(kuberay.head_service(child))
            self._reconcile_workloads()

    def _find(self, kind: str, name: str) -> dict[str, Any]:
        return next(o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name)

    def _reconcile_workloads(self) -> None:
        """The ReplicaSet controller and KubeRay: as many live pods per workload as desired."""
        for obj in self.objects:
            if obj["kind"] == "Deployment":
                owner = f"Deployment/{obj['metadata']['name']}"
                template = obj["spec"]["template"]
                for _ in range(obj["spec"].get("replicas", 1) - self._live(owner)):
                    suffix = os.urandom(3).hex()[:5]
                    manifest = {"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": f"{obj['metadata']['name']}-{suffix}",
                                             "namespace": obj["metadata"]["namespace"],
                                             "labels": dict(template["metadata"].get("labels", {}))},
                                "spec": copy.deepcopy(template["spec"])}
                    self._create_pod(manifest, owner)
            elif obj["kind"] == "RayCluster":
                for group, (node_type, spec, replicas) in kuberay.desired_pods(obj).items():
                    owner = f"RayCluster/{obj['metadata']['name']}/{group}"
                    for _ in range(replicas - self._live(owner)):
                        self._create_pod(kuberay.build_pod(obj, node_type, spec), owner)

    def _live(self, owner: str) -> int:
        return sum(1 for p in self.pods if p.owner == owner and not p.deleted)

    def _create_pod(self, manifest: dict[str, Any], owner: str) -> Pod:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        if self._next_ip > 254:
            raise RuntimeError("the harness ran out of pod addresses")
        name = manifest["metadata"]["name"]
        spec = manifest["spec"]
        containers = [Container(c, init=True) for c in spec.get("initContainers", [])]
        containers += [Container(c, init=False) for c in spec["containers"]]
        assert self._net is not None
        pod = Pod(manifest, self._net.attach(ip), self.dir / name, owner, containers)
        self._prepare_volumes(pod)
        self.pods.append(pod)
        return pod

    # ---- volumes and names -----------------------------------------------------------------------
    def _prepare_volumes(self, pod: Pod) -> None:
        spec = pod.manifest["spec"]
        security = spec.get("securityContext", {})
        fs_group = security.get("fsGroup")
        for vol in spec.get("volumes", []):
            path = pod.dir / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                os.chown(path, 0, fs_group if fs_group is not None else 0)
                os.chmod(path, 0o2777 if fs_group is None else 0o2775)
            elif "configMap" in vol:
                data = self._find("ConfigMap", vol["configMap"]["name"])["data"]
                self._write_files(path, data, fs_group)
            elif "secret" in vol:
                name = vol["secret"]["secretName"]
                if name not in self.secrets:
                    raise ValueError(f"pod {pod.name}: Secret {name!r} is not given to the harness")
                self._write_files(path, self.secrets[name], fs_group)
            else:
                raise ValueError(f"pod {pod.name}: volume {vol['name']!r} has a source the harness does not model")
        os.chmod(pod.dir, 0o755)

    @staticmethod
    def _write_files(path: Path, data: dict[str, str], fs_group: int | None) -> None:
        for key, value in data.items():
            (path / key).write_text(value)
            os.chmod(path / key, 0o644)
            if fs_group is not None:
                os.chown(path / key, 0, fs_group)

    def _service_addresses(self) -> dict[str, str]:
        """Service name -> one selected pod's address (the first live one)."""
        out: dict[str, str] = {}
        for svc in (o for o in self.objects if o["kind"] == "Service"):
            spec = svc["spec"]
            for port in spec.get("ports", []):
                if isinstance(port.get("targetPort"), int) and port["targetPort"] != port["port"]:
                    raise ValueError(f"Service {svc['metadata']['name']}: the harness needs port == targetPort")
            pods = [p for p in self.pods if not p.deleted and selects(spec["selector"], p.labels)]
            if pods:
                ns = svc["metadata"]["namespace"]
                name = svc["metadata"]["name"]
                for alias in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                    out[alias] = pods[0].ip
        return out

    def _hosts_file(self, pod: Pod) -> str:
        lines = ["127.0.0.1 localhost", f"{pod.ip} {pod.name}"]
        by_ip: dict[str, list[str]] = {}
        for alias, ip in self._service_addresses().items():
            by_ip.setdefault(ip, []).append(alias)
        lines += [f"{ip} {' '.join(aliases)}" for ip, aliases in by_ip.items()]
        path = pod.dir / "hosts"
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        return str(path)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                for pod in [p for p in self.pods if not p.deleted]:
                    self._kubelet.tick(pod, now)
                self._reconcile_workloads()
            self._stop.wait(self._tick_s)

    # ---- what tests and status read ---------------------------------------------------------------
    def delete_pod(self, name: str) -> None:
        """Kills every process of the pod and deletes it; its controller creates a replacement."""
        with self._lock:
            pod = next(p for p in self.pods if p.name == name and not p.deleted)
            self._kubelet.kill_pod(pod)
            pod.deleted = True
            assert self._net is not None
            self._net.detach(pod.endpoint)

    def live_pods(self, **labels: str) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods if not p.deleted and selects(labels, p.labels)]

    def pod_objects(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        """Pods as the API server lists them (metadata, spec, status)."""
        return [{**p.manifest, "status": p.status()} for p in self.live_pods(**selector)]

    def deployment_object(self, name: str) -> dict[str, Any]:
        with self._lock:
            obj = copy.deepcopy(self._find("Deployment", name))
            owner = f"Deployment/{name}"
            pods = [p for p in self.pods if p.owner == owner and not p.deleted]
            obj["status"] = {"replicas": len(pods), "readyReplicas": sum(p.is_ready() for p in pods)}
            return obj

    def raycluster_object(self, name: str) -> dict[str, Any]:
        """KubeRay reports state "ready" once every Ray pod is running and ready."""
        with self._lock:
            obj = copy.deepcopy(self._find("RayCluster", name))
            pods = [p for p in self.pods if p.owner.startswith(f"RayCluster/{name}/") and not p.deleted]
            want = sum(r for _, _, r in kuberay.desired_pods(obj).values())
            ready = len(pods) == want and all(p.is_ready() for p in pods)
            obj["status"] = {"state": "ready" if ready else "", "readyWorkerReplicas":
                             sum(p.is_ready() for p in pods if p.labels.get("ray.io/node-type") == "worker")}
            return obj

    def logs(self, pod: Pod, container: str, tail: int = 40) -> str:
        path = pod.dir / "containers" / container / "output.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-tail:])

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
