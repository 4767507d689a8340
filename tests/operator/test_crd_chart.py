"""The generated CRD and install.yaml are current; the Helm chart renders, validates its values, and matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart

from k2serve.operator import crd
from k2serve.operator.spec import K2DeploymentSpec

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/k2serve"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if "items" in node:
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crd_and_install_are_current() -> None:
    assert crd.CRD_FILE.read_text() == crd.crd_yaml(), "run `k2serve crd --write`"
    assert crd.INSTALL_FILE.read_text() == crd.install_yaml(), "run `k2serve crd --write`"


def test_crd_schema_is_structural_with_validation() -> None:
    version = crd.render_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "$defs", "title"} & set(node), f"{path} is not structural"
        if node["type"] == "object":
            assert "properties" in node or "additionalProperties" in node or \
                node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata", path
    spec = schema["properties"]["spec"]
    assert spec["properties"]["router"]["properties"]["replicas"]["minimum"] == 1
    assert spec["properties"]["model"]["properties"]["quantization"]["enum"] == ["auto", "int4", "bf16"]
    rules = {v["fieldPath"]: v["rule"] for v in spec["x-kubernetes-validations"]}
    assert rules[".decode.expertParallel"] == \
        "!has(self.model.experts) || self.model.experts % self.decode.expertParallel == 0"
    assert rules[".decode.groups"] == "self.decode.groups >= 1"
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.decode.groups"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Prefill", "Decode", "Endpoint",
                                                                        "Age"]
    assert crd.render_crd()["spec"]["names"]["shortNames"] == ["k2d"]


@pytest.mark.parametrize(("spec", "field"), [
    ({"model": {"experts": 384}, "prefill": {"expertParallel": 7}}, "spec.prefill.expertParallel"),
    ({"router": {"replicas": -3}}, "router.replicas"),
    ({"decode": {"groups": 0}}, "spec.decode.groups"),
    ({"model": {"quantization": "fp8"}}, "model.quantization"),
])
def test_spec_model_refuses_bad_specs_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        K2DeploymentSpec.model_validate(spec)


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = Chart.load(str(CHART)).render(values, name=crd.INSTALL_RELEASE, namespace=crd.INSTALL_NAMESPACE,
                                             is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values", [{}, {"replicas": 3, "resyncSeconds": 10, "nodeSelector": {"pool": "cpu"},
                                         "priorityClassName": "system-cluster-critical",
                                         "image": {"repository": "registry.local/k2serve", "tag": "dev"}},
                                    {"rbac": {"scope": "namespace"}, "watchNamespaces": ["team-a", "team-b"],
                                     "allowedImagePrefixes": ["ghcr.io/k2serve/"]}])
def test_chart_renders_valid_hardened_objects(values: dict[str, Any]) -> None:
    docs = _render(values)
    for doc in docs:
        if doc["kind"] not in ("ClusterKopfPeering", "KopfPeering"):
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["command"][:2] == ["k2serve", "operator"]
    assert deployment["spec"]["replicas"] == values.get("replicas", 2)


def test_namespace_scope_grants_a_role_per_watched_namespace_and_nothing_cluster_wide() -> None:
    docs = _render({"rbac": {"scope": "namespace"}, "watchNamespaces": ["team-a", "team-b"],
                    "allowedImagePrefixes": ["ghcr.io/k2serve/", "registry.local/"]})
    kinds = {(d["kind"], d["metadata"].get("namespace")) for d in docs}
    for ns in ("team-a", "team-b"):
        assert {("Role", ns), ("RoleBinding", ns), ("KopfPeering", ns)} <= kinds
    assert not {kind for kind, _ in kinds} & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    cluster_role = next(d for d in _render({}) if d["kind"] == "ClusterRole")
    role = next(d for d in docs if d["kind"] == "Role")
    # The same rights, less cluster-wide discovery, with the namespaced peering object.
    assert [r for r in role["rules"] if r["resources"] != ["kopfpeerings"]] == \
        [r for r in cluster_role["rules"] if r["resources"] not in (["customresourcedefinitions"],
                                                                     ["clusterkopfpeerings"])]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["namespace"] == crd.INSTALL_NAMESPACE
    command = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--all-namespaces" not in command
    assert [command[i + 1] for i, a in enumerate(command) if a == "--namespace"] == ["team-a", "team-b"]
    assert [command[i + 1] for i, a in enumerate(command) if a == "--allowed-image-prefix"] == \
        ["ghcr.io/k2serve/", "registry.local/"]
    assert "--all-namespaces" in next(d for d in _render({}) if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["command"]


@pytest.mark.parametrize("values", [{"replicas": 0}, {"replicas": "two"}, {"resyncSeconds": -1},
                                    {"image": {"repository": "", "tag": "x"}}, {"unknownKey": True},
                                    {"peeringName": "Not_A_Name"}, {"rbac": {"scope": "namespace"}},
                                    {"rbac": {"scope": "tenant"}}, {"watchNamespaces": ["Not_A_Namespace"]},
                                    {"allowedImagePrefixes": [""]}])
def test_chart_refuses_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="(?i)schema|values"):
        _render(values)


def test_install_yaml_equals_chart_defaults() -> None:
    installed = [d for d in yaml.safe_load_all(crd.INSTALL_FILE.read_text()) if d]
    chart_objects = _render({})
    crds = [d for d in installed if d["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {"k2deployments.k2serve.io", "clusterkopfpeerings.kopf.dev",
                                                     "kopfpeerings.kopf.dev"}
    rest = [d for d in installed if d["kind"] not in ("CustomResourceDefinition", "Namespace")]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rest, key=key) == sorted(chart_objects, key=key)
