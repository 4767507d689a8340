"""spec.router.gateway through the real kopf operator against kmock, in a cluster that serves the Gateway API and
the Inference Extension: the InferencePool and HTTPRoute are created (owned by the K2Deployment), removed when the
gateway is unset, and every call the operator made on them is granted by the chart's ClusterRole."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from helpers.kmock_cluster import running_cluster

from k2serve.operator import kube as k
from k2serve.operator.spec import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
K2D = k.Ref(GROUP, VERSION, PLURAL, "K2Deployment")
SAMPLE = yaml.safe_load((REPO / "manifests/samples/tiny-k2.yaml").read_text())
NS, NAME = SAMPLE["metadata"]["namespace"], "exposed"
GATEWAY = {"name": "inference-gw", "endpointPicker": {"name": "k2-epp", "portNumber": 9002}}
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}


def crd(ref: k.Ref) -> dict[str, Any]:
    """Enough of the published CRD for discovery (names and scope)."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{ref.plural}.{ref.group}"},
            "spec": {"group": ref.group, "scope": "Namespaced",
                     "names": {"kind": ref.kind, "plural": ref.plural, "singular": ref.kind.lower()},
                     "versions": [{"name": ref.version, "served": True, "storage": True}]}}


def eventually(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + 30
    while not (got := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def test_gateway_children_follow_the_spec(tmp_path: Path) -> None:
    with running_cluster(True, tmp_path) as c:
        for ref in (k.INFERENCEPOOL, k.HTTPROUTE):
            c.apply_crd(crd(ref))
        cr = copy.deepcopy(SAMPLE)
        cr["metadata"]["name"] = NAME
        cr["spec"].setdefault("router", {})["gateway"] = GATEWAY
        c.kube._call("POST", K2D.path(NS), body=cr)
        owner = eventually("the CR", lambda: c.kube.get(K2D, NS, NAME))["metadata"]["uid"]
        pool = eventually("the InferencePool", lambda: c.kube.get(k.INFERENCEPOOL, NS, f"{NAME}-router"))
        route = eventually("the HTTPRoute", lambda: c.kube.get(k.HTTPROUTE, NS, f"{NAME}-router"))
        for child in (pool, route):
            assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [owner]
        router = c.kube.get(k.DEPLOYMENT, NS, f"{NAME}-router")
        assert pool["spec"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]
        assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]

        c.kube.patch(K2D, NS, NAME, {"spec": {"router": {"gateway": None}}})
        eventually("the InferencePool removed", lambda: c.kube.get(k.INFERENCEPOOL, NS, f"{NAME}-router") is None)
        eventually("the HTTPRoute removed", lambda: c.kube.get(k.HTTPROUTE, NS, f"{NAME}-router") is None)

        used = {(r.resource.group, r.resource.plural, VERBS[r.method.value]) for r in c.requests()
                if r.resource is not None and r.resource.plural in ("inferencepools", "httproutes")
                and r.headers.get("User-Agent", "").startswith(("kopf/", "OpenAPI-Generator/"))
                and r.method in (kmock.method.GET, kmock.method.POST, kmock.method.PATCH, kmock.method.DELETE)}
    install = [d for d in yaml.safe_load_all((REPO / "manifests/install.yaml").read_text()) if d]
    role = next(d for d in install if d["kind"] == "ClusterRole")
    granted = {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
               for v in rule["verbs"]}
    assert {(g, res, v) for g, res, v in used} >= {("inference.networking.k8s.io", "inferencepools", "create"),
                                                    ("gateway.networking.k8s.io", "httproutes", "delete")}
    assert used <= granted, sorted(used - granted)
