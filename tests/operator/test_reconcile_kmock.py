"""The real kopf operator and kubernetes client against the kmock emulator: the issue's acceptance walk."""

from __future__ import annotations

import copy
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml
from helpers.kmock_cluster import OPERATOR_AGENTS, request_verb, wait_for
from prometheus_client.parser import text_string_to_metric_families

from k2serve.download import PROGRESS_KEY, Progress
from k2serve.operator import kube as k
from k2serve.operator.download_job import job_name, progress_name, render_download
from k2serve.operator.handlers import covers
from k2serve.operator.crd import render_crd
from k2serve.operator.render import render_children
from k2serve.operator.spec import GROUP, PLURAL, VERSION, K2DeploymentSpec

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)
K2D = k.Ref(GROUP, VERSION, PLURAL, "K2Deployment")
TINY = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
NS = TINY["metadata"]["namespace"]


def _cr(name: str, **spec_changes: Any) -> dict[str, Any]:
    cr = copy.deepcopy(TINY)
    cr["metadata"]["name"] = name
    for path, value in spec_changes.items():
        node = cr["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cr


def _children(name: str) -> list[dict[str, Any]]:
    return render_children(name, NS, K2DeploymentSpec.model_validate(TINY["spec"]), service_monitor=False)


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def _jsonpath(obj: dict[str, Any], path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part, {}) if isinstance(obj, dict) else {}
    return obj


def _mark_ready(c: Any, name: str, groups: dict[str, tuple[int, int]]) -> None:
    """What KubeRay and the kubelet would do: RayAny ready, worker pods Ready, router replicas ready."""
    c.kube.patch(k.RAYCLUSTER, NS, f"{name}-ray", {"status": {"state": "ready"}})
    c.kube.patch(k.DEPLOYMENT, NS, f"{name}-router", {"status": {"readyReplicas": 1}})
    for pool, (count, ep) in groups.items():
        for i in range(count * ep):
            c.kube._call("POST", k.POD.path(NS), body={
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{pool}-{i}", "namespace": NS, "labels": {
                    "ray.io/cluster": f"{name}-ray", "ray.io/node-type": "worker", "ray.io/group": f"{pool}-workers"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            })


def _events(c: Any) -> list[dict[str, Any]]:
    return [obj.raw for (res, _, _), obj in c.emulator.objects.items() if res.plural == "events"]


@pytest.fixture(scope="module")
def cluster(cluster_factory: Any) -> Any:
    return cluster_factory(True)


def test_tiny_sample_lifecycle(cluster: Any) -> None:
    c, name = cluster, "tiny-k2"
    c.kube._call("POST", K2D.path(NS), body=_cr(name))
    cr = wait_for("the CR's uid", lambda: c.kube.get(K2D, NS, name))

    # Children exist and are owned by the CR.
    for child in _children(name):
        got = wait_for(f"{child['kind']} {child['metadata']['name']}",
                       lambda: c.kube.get(k.ref_of(child), NS, child["metadata"]["name"]))
        owners = got["metadata"].get("ownerReferences", [])
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("K2Deployment", name, cr["metadata"]["uid"])]
        assert owners[0]["controller"] is True
    token = wait_for("cluster token", lambda: c.kube.get(k.SECRET, NS, f"{name}-cluster-token"))
    assert [o["uid"] for o in token["metadata"]["ownerReferences"]] == [cr["metadata"]["uid"]]
    assert len(token["data"]["token"]) >= 32
    progressing = wait_for("status", lambda: c.kube.get(K2D, NS, name).get("status", {}).get("phase"))
    assert progressing == "Progressing"

    # Ready once the children are.
    _mark_ready(c, name, {"prefill": (1, 2), "decode": (1, 2)})
    ready = wait_for("Ready=True", lambda: (o := c.kube.get(K2D, NS, name)) and
                     _condition(o, "Ready").get("status") == "True" and o)
    columns = {col["name"]: _jsonpath(ready, col["jsonPath"])
               for col in render_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Phase"] == "Ready"
    assert columns["Prefill"] == "1/1" and columns["Decode"] == "1/1"
    assert columns["Endpoint"] == f"http://{name}-router.{NS}.svc:8000"
    assert columns["Age"]
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]

    # Scaling decode 1 -> 3 patches the RayAny's decode worker group to 3 groups x EP 2 pods.
    c.kube.patch(K2D, NS, name, {"spec": {"decode": {"groups": 3}}})

    def decode_replicas() -> int | None:
        rc = c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray")
        return next(g["replicas"] for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "decode-workers")

    wait_for("decode replicas 6", lambda: decode_replicas() == 6)
    degraded = wait_for("not Ready while scaling", lambda: (o := c.kube.get(K2D, NS, name)) and
                        o["status"]["decode"]["readiness"] == "1/3" and o)
    assert _condition(degraded, "Ready")["status"] == "False"
    assert any(r.method == kmock.method.PATCH and r.url.path == k.RAYCLUSTER.path(NS, f"{name}-ray")
               for r in c.requests())

    # Level-based: the resync timer reverts drift in any child.
    drift = {k.DEPLOYMENT: {"spec": {"replicas": 7}}, k.SERVICE: {"spec": {"type": "NodePort"}},
             k.PDB: {"spec": {"maxUnavailable": 3}}, k.NETWORKPOLICY: {"spec": {"policyTypes": ["Egress"]}},
             k.CONFIGMAP: {"data": {"config.yaml": "{}"}}}
    spec_now = K2DeploymentSpec.model_validate(c.kube.get(K2D, NS, name)["spec"])
    wanted = {k.ref_of(child): child for child in render_children(name, NS, spec_now, service_monitor=False)}
    for ref, change in drift.items():
        c.kube.patch(ref, NS, wanted[ref]["metadata"]["name"], change)
    for ref in drift:
        key = next(iter(drift[ref]))
        wait_for(f"{ref.kind} drift reverted", lambda: c.kube.get(ref, NS, wanted[ref]["metadata"]["name"])[key]
                 == {**c.kube.get(ref, NS, wanted[ref]["metadata"]["name"])[key], **wanted[ref][key]})

    # The token is created once: resyncs leave it as it was.
    assert c.kube.get(k.SECRET, NS, f"{name}-cluster-token")["data"] == token["data"]

    # Deleting the CR deletes the children (explicitly: kmock has no garbage collector).
    c.kube.delete(K2D, NS, name)
    for child in _children(name):
        wait_for(f"{child['kind']} deleted", lambda: c.kube.get(k.ref_of(child), NS, child["metadata"]["name"]) is None)
    wait_for("token deleted", lambda: c.kube.get(k.SECRET, NS, f"{name}-cluster-token") is None)
    wait_for("CR gone", lambda: c.kube.get(K2D, NS, name) is None)
    assert {"Reconciled", "Ready", "Deleted"} <= {event.get("reason") for event in _events(c)}

    # The operator's own metrics saw the reconciles and the deployment come and go.
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(urllib.request.urlopen(c.metrics_url).read().decode())
               for s in family.samples}
    assert samples[("k2serve_operator_reconciles_total", (("outcome", "ok"),))] >= 3
    assert samples[("k2serve_operator_reconcile_duration_seconds_count", ())] >= 3
    assert samples[("k2serve_operator_managed_deployments", ())] == 0


@pytest.mark.parametrize(("changes", "field"), [
    ({"model.experts": 384, "decode.expertParallel": 5}, "spec.decode.expertParallel"),
    ({"router.replicas": -1}, "spec.router.replicas"),
    ({"prefill.groups": -2}, "spec.prefill.groups"),
])
def test_invalid_spec_is_refused_naming_the_field(cluster: Any, changes: dict[str, Any], field: str) -> None:
    c = cluster
    name = "bad-" + field.rsplit(".", 1)[-1].lower()
    c.kube._call("POST", K2D.path(NS), body=_cr(name, **changes))
    obj = wait_for("Invalid phase", lambda: (o := c.kube.get(K2D, NS, name)) and
                   o.get("status", {}).get("phase") == "Invalid" and o)
    assert field in _condition(obj, "Degraded")["message"]
    assert _condition(obj, "Ready")["reason"] == "InvalidSpec"
    assert c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray") is None  # nothing rendered from a bad spec
    warnings = [e for e in _events(c) if e.get("reason") == "InvalidSpec"
                and e.get("involvedObject", {}).get("name") == name]
    assert warnings and field in warnings[0]["message"]


def test_missing_kuberay_is_a_clear_degraded_condition(cluster_factory: Any) -> None:
    c = cluster_factory(False)
    c.kube._call("POST", K2D.path(NS), body=_cr("no-kuberay"))
    obj = wait_for("Degraded", lambda: (o := c.kube.get(K2D, NS, "no-kuberay")) and
                   _condition(o, "Degraded").get("status") == "True" and o)
    assert _condition(obj, "Degraded")["reason"] == "KubeRayMissing"
    assert "KubeRay" in _condition(obj, "Degraded")["message"]
    assert obj["status"]["phase"] == "Degraded"
    assert c.kube.get(k.DEPLOYMENT, NS, "no-kuberay-router") is not None  # the rest is still converged


HF_SOURCE = "hf://moonshotai/Tiny-K2@v1"
# Several reconciles per step; the machine running these tests may be shared and slow.
LOADED = 120.0
KIMI = yaml.safe_load((REPO / "manifests/samples/kimi-k2-thinking.yaml").read_text())


def wait_slow(what: str, probe: Callable[[], Any]) -> Any:
    return wait_for(what, probe, LOADED)


def _download_children(name: str, source: str) -> list[dict[str, Any]]:
    spec = K2DeploymentSpec.model_validate(_cr(name, **{"model.source": source, "model.pvc": "models"})["spec"])
    return render_download(name, NS, spec)


@pytest.mark.timeout(900)
def test_hf_source_downloads_then_starts_workers(cluster: Any) -> None:
    c, name = cluster, "hf-k2"
    c.kube._call("POST", K2D.path(NS), body=_cr(name, **{"model.source": HF_SOURCE, "model.pvc": "models",
                                                           "model.hfTokenSecret": {"name": "hf", "key": "token"}}))
    for child in _download_children(name, HF_SOURCE):
        got = wait_slow(f"{child['kind']} {child['metadata']['name']}",
                       lambda: c.kube.get(k.ref_of(child), NS, child["metadata"]["name"]))
        kubernetes_validate.validate(child, "1.33.0", strict=True)
        assert got["metadata"]["ownerReferences"][0]["name"] == name
    job = c.kube.get(k.JOB, NS, job_name(name, HF_SOURCE))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["k2serve", "download", HF_SOURCE]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]

    downloading = wait_slow("ModelReady=False", lambda: (o := c.kube.get(K2D, NS, name)) and
                           _condition(o, "ModelReady").get("reason") == "Downloading" and o)
    assert _condition(downloading, "ModelReady")["status"] == "False"
    assert c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray") is None  # gated: no worker group yet
    assert c.kube.get(k.DEPLOYMENT, NS, f"{name}-router") is not None
    config = yaml.safe_load(c.kube.get(k.CONFIGMAP, NS, f"{name}-config")["data"]["config.yaml"])
    assert config["model"]["source"] == "/models/moonshotai/Tiny-K2/v1"

    # What the Job's entry point writes as it goes, then what the Job controller records at the end.
    c.kube.patch(k.CONFIGMAP, NS, progress_name(name), {"data": {PROGRESS_KEY: Progress(1000, 4000).to_json()}})
    progressed = wait_slow("progress in status", lambda: (o := c.kube.get(K2D, NS, name)) and
                          o["status"].get("model", {}).get("bytesDone") == 1000 and o)
    assert progressed["status"]["model"]["bytesTotal"] == 4000
    assert "1000/4000 bytes" in _condition(progressed, "ModelReady")["message"]
    c.kube.patch(k.CONFIGMAP, NS, progress_name(name), {"data": {PROGRESS_KEY: Progress(4000, 4000, True).to_json()}})
    c.kube.patch(k.JOB, NS, job_name(name, HF_SOURCE), {"status": {"succeeded": 1}})
    ready = wait_slow("ModelReady=True", lambda: (o := c.kube.get(K2D, NS, name)) and
                     _condition(o, "ModelReady").get("status") == "True" and o)
    assert _condition(ready, "ModelReady")["reason"] == "Downloaded"
    assert _condition(ready, "Schedulable")["status"] == "True"
    wait_slow("RayCluster once the model is ready", lambda: c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray"))

    # Level-based here too: a widened Role, a re-pointed binding or a tampered Job label is put back.
    rendered = {k.ref_of(child): child for child in _download_children(name, HF_SOURCE)}
    drift = {k.ROLE: {"rules": [{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["*"]}]},
             k.ROLEBINDING: {"subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NS}]},
             k.SERVICEACCOUNT: {"automountServiceAccountToken": False},
             k.JOB: {"metadata": {"labels": {"app.kubernetes.io/component": "tampered"}}}}
    for ref, change in drift.items():
        c.kube.patch(ref, NS, rendered[ref]["metadata"]["name"], change)
    for ref, change in drift.items():
        key, want = next(iter(change)), rendered[ref]
        wait_slow(f"{ref.kind} drift reverted", lambda: covers(c.kube.get(ref, NS, want["metadata"]["name"])[key],
                                                              want[key]))

    # A new revision: a new Job into a new folder; the config keeps the old folder until it is complete.
    v2 = HF_SOURCE.replace("@v1", "@v2")
    c.kube.patch(K2D, NS, name, {"spec": {"model": {"source": v2}}})
    wait_slow("a second Job", lambda: c.kube.get(k.JOB, NS, job_name(name, v2)))
    assert job_name(name, v2) != job_name(name, HF_SOURCE)
    wait_slow("ModelReady=False again", lambda: _condition(c.kube.get(K2D, NS, name), "ModelReady").get("status")
             == "False")
    config = yaml.safe_load(c.kube.get(k.CONFIGMAP, NS, f"{name}-config")["data"]["config.yaml"])
    assert config["model"]["source"] == "/models/moonshotai/Tiny-K2/v1"
    c.kube.patch(k.JOB, NS, job_name(name, v2), {"status": {"succeeded": 1}})
    wait_slow("config on the new folder", lambda: yaml.safe_load(c.kube.get(k.CONFIGMAP, NS, f"{name}-config")[
        "data"]["config.yaml"])["model"]["source"] == "/models/moonshotai/Tiny-K2/v2")

    c.kube.delete(K2D, NS, name)
    for child in _download_children(name, v2):
        ref, child_name = k.ref_of(child), child["metadata"]["name"]
        wait_slow(f"{child['kind']} deleted", lambda: c.kube.get(ref, NS, child_name) is None)


@pytest.mark.timeout(400)
def test_infeasible_gpu_plan_is_refused_before_any_pod(cluster: Any) -> None:
    c, name = cluster, "k2-h100-ep8"
    cr = copy.deepcopy(KIMI)
    cr["metadata"].update(name=name, namespace=NS)
    cr["spec"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    for pool in ("prefill", "decode"):
        cr["spec"][pool]["expertParallel"] = 8
    c.kube._call("POST", K2D.path(NS), body=cr)
    refused = wait_slow("Schedulable=False", lambda: (o := c.kube.get(K2D, NS, name)) and
                       _condition(o, "Schedulable").get("status") == "False" and o)
    message = _condition(refused, "Schedulable")["message"]
    assert _condition(refused, "Schedulable")["reason"] == "InsufficientMemory"
    assert re.search(r"needs \d+\.\d GB per device but only 85\.5 GB is available", message), message
    assert refused["status"]["phase"] == "Degraded" and _condition(refused, "Ready")["status"] == "False"
    events = [e for e in _events(c) if e.get("reason") == "Unschedulable"
              and e.get("involvedObject", {}).get("name") == name]
    assert events and "85.5 GB" in events[0]["message"]
    for child in render_children(name, NS, K2DeploymentSpec.model_validate(cr["spec"]), service_monitor=False):
        assert c.kube.get(k.ref_of(child), NS, child["metadata"]["name"]) is None  # nothing, so no pod, created

    # The shipped sample's H200 at EP 16 fits: accepted, children created.
    c.kube.patch(K2D, NS, name, {"spec": {"nodeSelector": KIMI["spec"]["nodeSelector"],
                                          "prefill": {"expertParallel": 16}, "decode": {"expertParallel": 16}}})
    fits = wait_slow("Schedulable=True", lambda: (o := c.kube.get(K2D, NS, name)) and
                    _condition(o, "Schedulable").get("status") == "True" and o)
    assert "H200-141GB" in _condition(fits, "Schedulable")["message"]
    wait_slow("RayCluster", lambda: c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray"))
    c.kube.delete(K2D, NS, name)
    wait_slow("CR gone", lambda: c.kube.get(K2D, NS, name) is None)


@pytest.mark.timeout(900)  # run alone, it first drives the two walks above
def test_cluster_role_grants_exactly_what_the_operator_calls(cluster: Any) -> None:
    # Runs after the lifecycle above in this module's cluster; on its own it drives one CR through the same.
    if not any(r.url.path.endswith("/rayclusters/tiny-k2-ray") for r in cluster.requests()):
        test_tiny_sample_lifecycle(cluster)
    if not any(r.url.path.endswith("/serviceaccounts/hf-k2-model-download") for r in cluster.requests()):
        test_hf_source_downloads_then_starts_workers(cluster)
    used: set[tuple[str, str, str]] = set()
    for r in cluster.requests():
        if r.resource is None or not r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            continue  # the test's own calls and discovery (non-resource URLs) need no RBAC rule
        if r.resource.plural is None:
            continue
        resource = f"{r.resource.plural}/{r.subresource}" if r.subresource else r.resource.plural
        used.add((r.resource.group or "", resource, request_verb(r)))

    chart_rbac = list(yaml.safe_load_all((REPO / "manifests/install.yaml").read_text()))
    role = next(d for d in chart_rbac if d and d["kind"] == "ClusterRole")
    granted = {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
               for v in rule["verbs"]}
    # ServiceMonitors are used only where their CRD exists; this emulator has none, the same calls apply.
    # So are the Gateway API children: test_gateway_kmock.py checks their calls against the same grants.
    exercised_elsewhere = {(g, res, v) for g, res in (("monitoring.coreos.com", "servicemonitors"),
                                                      ("inference.networking.k8s.io", "inferencepools"),
                                                      ("gateway.networking.k8s.io", "httproutes"))
                           for v in ("get", "create", "patch", "delete")}
    missing = used - granted
    unused = granted - used - exercised_elsewhere
    assert not missing, f"operator calls without RBAC: {sorted(missing)}"
    assert not unused, f"RBAC grants never used: {sorted(unused)}"
