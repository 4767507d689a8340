"""The operator scoped to a list of namespaces (`--namespace`, the chart's `rbac.scope: namespace`) and its image
allow-list (`--allowed-image-prefix`), with the real kopf operator against the kmock emulator: a K2Deployment in a
watched namespace is reconciled, one elsewhere is never touched; every call the operator makes is covered by the
chart's Role in that namespace (none is cluster-wide: the chart then has no ClusterRole); an image outside the
allow-list is refused with a condition and an Event before any child exists."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python import Chart
from helpers.kmock_cluster import OPERATOR_AGENTS, Cluster, request_verb, running_cluster, wait_for

from k2serve.operator import crd
from k2serve.operator import kube as k
from k2serve.operator.image_policy import CONDITION
from k2serve.operator.render import render_children
from k2serve.operator.spec import GROUP, PLURAL, VERSION, K2DeploymentSpec

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)
K2D = k.Ref(GROUP, VERSION, PLURAL, "K2Deployment")
TINY = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
WATCHED, OTHER = "team-a", "team-b"
LOADED = 120.0  # seconds; the machine running these tests may be shared and slow
ALLOWED = "ghcr.io/k2serve/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(True, tmp_path_factory.mktemp("kube"), namespaces=(WATCHED,),
                         operator_args=("--allowed-image-prefix", ALLOWED)) as c:
        yield c


def tiny(name: str, namespace: str, image: str | None = None) -> dict[str, Any]:
    cr = copy.deepcopy(TINY)
    cr["metadata"].update(name=name, namespace=namespace)
    if image is not None:
        cr["spec"]["image"] = image
    return cr


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def rendered(values: dict[str, Any]) -> list[dict[str, Any]]:
    out = Chart.load(str(REPO / "charts/k2serve")).render(values, name=crd.INSTALL_RELEASE,
                                                          namespace=crd.INSTALL_NAMESPACE, is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_watched_namespace_only_and_every_call_within_the_namespaced_rbac(cluster: Cluster) -> None:
    c = cluster
    spec = K2DeploymentSpec.model_validate(TINY["spec"])
    c.kube._call("POST", K2D.path(OTHER), body=tiny("elsewhere", OTHER))
    c.kube._call("POST", K2D.path(WATCHED), body=tiny("mine", WATCHED))
    wait_for("the watched CR's RayCluster", lambda: c.kube.get(k.RAYCLUSTER, WATCHED, "mine-ray"), LOADED)
    wait_for("the watched CR's status", lambda: (c.kube.get(K2D, WATCHED, "mine") or {}).get("status"), LOADED)
    time.sleep(1.5)  # three resync periods: the other namespace's CR would have been reconciled by now
    assert "status" not in c.kube.get(K2D, OTHER, "elsewhere")
    for child in render_children("elsewhere", OTHER, spec, service_monitor=False):
        assert c.kube.get(k.ref_of(child), OTHER, child["metadata"]["name"]) is None

    docs = rendered({"rbac": {"scope": "namespace"}, "watchNamespaces": [WATCHED]})
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering")]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == WATCHED)
    namespaced, cluster_wide = set(), set()
    for r in c.requests():
        if r.resource is None or r.resource.plural is None or \
                not r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            continue
        resource = f"{r.resource.plural}/{r.subresource}" if r.subresource else r.resource.plural
        call = (r.resource.group or "", resource, request_verb(r))
        if r.namespace is None:
            cluster_wide.add(call)
        else:
            assert r.namespace == WATCHED, (r.method, r.url)  # nothing outside the watched namespace
            namespaced.add(call)
    assert not cluster_wide, sorted(cluster_wide)
    assert namespaced <= grants(role), sorted(namespaced - grants(role))
    assert ("k2serve.io", "k2deployments", "watch") in namespaced  # the recording is of a working operator
    c.kube.delete(K2D, WATCHED, "mine")
    wait_for("CR gone", lambda: c.kube.get(K2D, WATCHED, "mine") is None, LOADED)


def test_an_image_outside_the_allow_list_is_refused_before_any_child(cluster: Cluster) -> None:
    c = cluster
    bad = "evil.example/miner:latest"
    c.kube._call("POST", K2D.path(WATCHED), body=tiny("foreign", WATCHED, image=bad))
    refused = wait_for(f"{CONDITION}=False", lambda: (o := c.kube.get(K2D, WATCHED, "foreign")) and
                       condition(o, CONDITION).get("status") == "False" and o, LOADED)
    assert condition(refused, CONDITION)["reason"] == "ImageNotAllowed"
    assert bad in condition(refused, CONDITION)["message"] and refused["status"]["phase"] == "Degraded"
    events = [obj.raw for (res, _, _), obj in c.emulator.objects.items() if res.plural == "events"
              and obj.raw.get("reason") == "ImageNotAllowed"
              and obj.raw.get("involvedObject", {}).get("name") == "foreign"]
    assert events and bad in events[0]["message"]
    spec = K2DeploymentSpec.model_validate(tiny("foreign", WATCHED, image=bad)["spec"])
    for child in render_children("foreign", WATCHED, spec, service_monitor=False):
        assert c.kube.get(k.ref_of(child), WATCHED, child["metadata"]["name"]) is None

    # An allowed image: accepted, children created.
    c.kube.patch(K2D, WATCHED, "foreign", {"spec": {"image": ALLOWED + "k2serve:0.1.0"}})
    wait_for("RayCluster", lambda: c.kube.get(k.RAYCLUSTER, WATCHED, "foreign-ray"), LOADED)
    wait_for(f"{CONDITION}=True",
             lambda: condition(c.kube.get(K2D, WATCHED, "foreign"), CONDITION).get("status") == "True", LOADED)
