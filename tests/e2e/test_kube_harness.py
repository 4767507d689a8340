"""The harness itself (tests/kubelet): KubeRay's pod construction on the rendered RayCluster, and a container run
under its pod's security context, volumes, address and names."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2serve.operator.render import render_children
from k2serve.operator.spec import K2DeploymentSpec
from kubelet import kuberay
from kubelet.node import Cluster

REPO = Path(__file__).resolve().parents[2]


def _tiny_raycluster() -> dict[str, Any]:
    cr = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
    spec = K2DeploymentSpec.model_validate(cr["spec"])
    children = render_children(cr["metadata"]["name"], cr["metadata"]["namespace"], spec, service_monitor=False)
    return next(c for c in children if c["kind"] == "RayCluster")


def test_worker_pod_as_kuberay_builds_it() -> None:
    raycluster = _tiny_raycluster()
    group = raycluster["spec"]["workerGroupSpecs"][0]
    pod = kuberay.build_pod(raycluster, "worker", group)
    labels = pod["metadata"]["labels"]
    assert labels["ray.io/cluster"] == "tiny-k2-ray" and labels["ray.io/group"] == group["groupName"]
    assert labels["ray.io/node-type"] == "worker" and labels["app.kubernetes.io/name"] == "k2serve"
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == "wait-gcs-ready" and "ray health-check --address tiny-k2-ray-head-svc" in init["args"][0]
    ray = pod["spec"]["containers"][0]
    assert ray["command"] == ["/bin/bash", "-lc", "--"]
    words = shlex.split(ray["args"][0].split("; ", 1)[1])
    assert words[:2] == ["ray", "start"] and "--block" in words
    flags = dict(w[2:].split("=", 1) for w in words[2:] if "=" in w)
    assert flags["address"] == "tiny-k2-ray-head-svc.default.svc.cluster.local:6379"
    assert json.loads(flags["resources"]) == {"k2serve_prefill": 1}
    assert flags["num-cpus"] == "2" and flags["dashboard-agent-listen-port"] == "52365"
    env = {e["name"]: e.get("value") for e in ray["env"]}
    assert env["RAY_ADDRESS"] == "tiny-k2-ray-head-svc.default.svc.cluster.local:6379"
    assert env["KUBERAY_GEN_RAY_START_CMD"].startswith("ray start")
    assert ray["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert {"name": "metrics", "containerPort": 8080} in ray["ports"]


def test_head_pod_keeps_the_rendered_sidecar_and_gets_the_head_service() -> None:
    raycluster = _tiny_raycluster()
    pod = kuberay.build_pod(raycluster, "head", raycluster["spec"]["headGroupSpec"])
    assert [c["name"] for c in pod["spec"]["containers"]] == ["ray-head", "pool-controller"]
    assert "ray start --head" in pod["spec"]["containers"][0]["args"][0]
    assert "initContainers" not in pod["spec"]
    svc = kuberay.head_service(raycluster)
    assert svc["metadata"]["name"] == "tiny-k2-ray-head-svc"
    assert {p["port"] for p in svc["spec"]["ports"]} >= {6379, 10001, 8265}


def test_unmodelled_raycluster_fields_are_refused() -> None:
    raycluster = _tiny_raycluster()
    raycluster["spec"]["autoscalerOptions"] = {}
    with pytest.raises(ValueError, match="autoscalerOptions"):
        kuberay.build_pod(raycluster, "head", raycluster["spec"]["headGroupSpec"])


PROBE_SCRIPT = """
import json, os, socket
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
def writable(path):
    try:
        open(path, 'w').close()
        return True
    except OSError:
        return False
print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'host': socket.gethostname(),
    'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(), 'nnp': status['NoNewPrivs'].strip(),
    'root_writable': writable('/etc/probe'), 'tmp_writable': writable('/tmp/probe'),
    'config': open('/etc/k2serve/config.yaml').read(), 'config_writable': writable('/etc/k2serve/x'),
    'svc': socket.gethostbyname('echo'), 'env': os.environ['POD_NAME'], 'pid1': open('/proc/1/cmdline').read()}),
    flush=True)
import http.server
http.server.HTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_container_runs_under_its_pod_security_context(tmp_path: Path) -> None:
    labels = {"app": "echo"}
    children = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "default"},
         "data": {"config.yaml": "a: 1\n"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
         "spec": {"selector": labels, "ports": [{"port": 8080, "targetPort": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": "default"},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                      "containers": [{
                          "name": "echo", "command": ["python", "-c", PROBE_SCRIPT],
                          "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                          "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                          "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                              "capabilities": {"drop": ["ALL"]}},
                          "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                           {"name": "cfg", "mountPath": "/etc/k2serve", "readOnly": True}]}],
                      "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}]}}}},
    ]
    with Cluster(tmp_path / "node", tick_s=0.2) as cluster:
        cluster.apply(children)
        deadline = time.monotonic() + 60
        while not (ready := cluster.deployment_object("echo")["status"]["readyReplicas"]):
            assert time.monotonic() < deadline, cluster.logs(cluster.live_pods()[0], "echo")
            time.sleep(0.2)
        (pod,) = cluster.live_pods(app="echo")
        seen = json.loads(cluster.logs(pod, "echo").splitlines()[0])
        # Reachable only inside the cluster's network.
        assert cluster.in_network(lambda: __import__("urllib.request").request.urlopen(
            f"http://{pod.ip}:8080/", timeout=5).status) == 200
    assert ready == 1
    assert (seen["uid"], seen["gid"], seen["groups"]) == (1000, 1000, [1000])
    assert seen["host"] == pod.name == seen["env"]
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000" and seen["nnp"] == "1"
    assert not seen["root_writable"] and seen["tmp_writable"]
    assert seen["config"] == "a: 1\n" and not seen["config_writable"]
    assert seen["svc"] == pod.ip and pod.ip.startswith("127.0.0.")
    assert "python" in seen["pid1"]  # the container's own PID namespace: its command is PID 1
