"""`k2serve crd`: the K2Deployment CustomResourceDefinition, generated from the pydantic models in spec.py.

Pydantic emits JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3.0 schema: no $ref, no
anyOf-with-null (→ `nullable`), numeric `exclusiveMinimum` as a boolean, free-form objects marked
`x-kubernetes-preserve-unknown-fields`. `structural()` does exactly that translation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from k2serve.operator import spec as s

# Generated files: the chart's CRD, and manifests/install.yaml (CRDs + the chart rendered with its defaults).
# Tests keep both equal to what these functions produce.
REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts/k2serve"
CRD_FILE = CHART / "crds/k2deployments.yaml"
INSTALL_FILE = REPO / "manifests/install.yaml"
INSTALL_RELEASE, INSTALL_NAMESPACE = "k2serve", "k2serve-system"

_DROP = {"title", "additionalProperties", "$defs"}


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Translates one pydantic JSON-schema node into a structural OpenAPI v3.0 node."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {node['anyOf']} in a structural schema")
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        merged = structural({**options[0], **rest}, defs)
        merged["nullable"] = True
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = structural(value, defs)
    extra = node.get("additionalProperties")
    if node.get("type") == "object" and "properties" not in node:
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _schema(model: type[s.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    node = structural(raw, raw.get("$defs", {}))
    # Objects built by default_factory get `default: {}` so the API server fills their defaults, which the
    # CEL rules then rely on (e.g. self.decode.groups exists even when `decode` was omitted).
    for prop in node.get("properties", {}).values():
        if prop.get("type") == "object" and "properties" in prop and "default" not in prop:
            prop["default"] = {}
    return node


def spec_schema() -> dict[str, Any]:
    node = _schema(s.K2DeploymentSpec)
    node["x-kubernetes-validations"] = [
        {"rule": rule.cel, "message": f"spec.{rule.field}: {rule.message}", "fieldPath": f".{rule.field}",
         "reason": "FieldValueInvalid"}
        for rule in s.RULES
    ]
    return node


def render_crd() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.readiness",
         "description": "ready/desired prefill groups"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.decode.readiness",
         "description": "ready/desired decode groups"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {"kind": s.KIND, "plural": s.PLURAL, "singular": s.SINGULAR,
                      "shortNames": list(s.SHORT_NAMES), "categories": ["k2serve"]},
            "versions": [{
                "name": s.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A K2-architecture MoE model served by Ray-managed prefill/decode pools.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {**spec_schema(), "default": {}},
                        "status": _schema(s.K2DeploymentStatus),
                    },
                }},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.decode.groups",
                              "statusReplicasPath": ".status.decode.ready",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": columns,
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `k2serve crd --write` from k2serve/operator/spec.py; do not edit.\n"
    return header + yaml.safe_dump(render_crd(), sort_keys=False)


def install_yaml() -> str:
    """`kubectl apply -f manifests/install.yaml` = `helm install k2serve charts/k2serve -n k2serve-system`."""
    from helm_python import Chart  # the Helm engine; only needed to regenerate the committed file

    chart = Chart.load(str(CHART))
    rendered = chart.render({}, name=INSTALL_RELEASE, namespace=INSTALL_NAMESPACE, is_install=True)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": INSTALL_NAMESPACE}}
    docs = [crd_yaml(), (CHART / "crds/kopf-peering.yaml").read_text(), yaml.safe_dump(namespace, sort_keys=False)]
    docs += [rendered[path] for path in sorted(rendered) if rendered[path].strip()]
    header = "# Generated by `k2serve crd --write` (the Helm chart's defaults); do not edit.\n"
    return header + "\n---\n".join(d.strip() for d in docs) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve crd", description="Print the K2Deployment CRD YAML.")
    parser.add_argument("--write", action="store_true", help="regenerate the committed CRD files in the repo")
    args = parser.parse_args(argv)
    text = crd_yaml()
    if not args.write:
        sys.stdout.write(text)
        return 0
    CRD_FILE.write_text(text)
    INSTALL_FILE.write_text(install_yaml())
    print(f"wrote {CRD_FILE} and {INSTALL_FILE}")
    return 0
