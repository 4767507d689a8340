"""The Gateway API children of spec.router.gateway, checked field by field against the published v1 APIs, as
written from their API references:

- InferencePool, inference.networking.k8s.io/v1 (Gateway API Inference Extension v1.0): spec.selector.matchLabels
  (required, label keys/values), spec.targetPorts (exactly one `{number}` in 1..65535), spec.endpointPickerRef
  (name required; group "" and kind Service by default; portNumber 1..65535; failureMode FailOpen|FailClose).
- HTTPRoute, gateway.networking.k8s.io/v1 (Gateway API v1.x, standard channel): spec.parentRefs (≤ 32, each with a
  name; group/kind default to the Gateway), spec.hostnames (≤ 16), spec.rules (≤ 16) with matches (≤ 64; path type
  Exact|PathPrefix|RegularExpression, value starting with `/`) and backendRefs (≤ 16; name required; a port only
  for Services; weight 0..1000000).

Beyond the fields, the checks tie the objects to what they must reach: the pool selects exactly the router pods
and targets the port their container listens on; the route's backend is that pool and its parent the named
Gateway. A wrong port or selector fails them."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from k2serve.operator.gateway import render_gateway
from k2serve.operator.render import render_children, render_router_deployment
from k2serve.operator.spec import K2DeploymentSpec

NAME, NS = "k2", "serving"
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def only(obj: dict[str, Any], allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{key}: not a field of the v1 API" for key in obj if key not in allowed]


def port_ok(value: Any) -> bool:
    return isinstance(value, int) and 1 <= value <= 65535


def check_inference_pool(pool: dict[str, Any], router: dict[str, Any]) -> list[str]:
    """Problems of an InferencePool (v1) meant to front the `router` Deployment's pods."""
    problems = only(pool, {"apiVersion", "kind", "metadata", "spec"}, "")
    if (pool.get("apiVersion"), pool.get("kind")) != ("inference.networking.k8s.io/v1", "InferencePool"):
        problems.append("not an inference.networking.k8s.io/v1 InferencePool")
    spec = pool.get("spec", {})
    problems += only(spec, {"selector", "targetPorts", "endpointPickerRef"}, "spec")
    labels = spec.get("selector", {}).get("matchLabels", {})
    problems += only(spec.get("selector", {}), {"matchLabels"}, "spec.selector")
    if not labels or len(labels) > 64:
        problems.append("spec.selector.matchLabels: 1 to 64 labels required")
    problems += [f"spec.selector.matchLabels: bad label {k}={v}" for k, v in labels.items()
                 if not (LABEL_KEY.match(k) and isinstance(v, str) and len(v) <= 63 and LABEL_VALUE.match(v))]
    ports = spec.get("targetPorts", [])
    if len(ports) != 1 or any(set(p) != {"number"} or not port_ok(p["number"]) for p in ports):
        problems.append("spec.targetPorts: exactly one {number: 1..65535}")
    epp = spec.get("endpointPickerRef", {})
    problems += only(epp, {"group", "kind", "name", "portNumber", "failureMode"}, "spec.endpointPickerRef")
    if not epp.get("name") or epp.get("group", "") != "" or epp.get("kind", "Service") != "Service":
        problems.append("spec.endpointPickerRef: a core Service by name")
    if "portNumber" in epp and not port_ok(epp["portNumber"]):
        problems.append("spec.endpointPickerRef.portNumber: 1..65535")
    if epp.get("failureMode", "FailClose") not in ("FailOpen", "FailClose"):
        problems.append("spec.endpointPickerRef.failureMode: FailOpen or FailClose")
    # What it must reach: every router pod, nothing else, on the port its container serves HTTP on.
    template = router["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    if not labels or any(pod_labels.get(k) != v for k, v in labels.items()):
        problems.append("spec.selector: does not select the router pods")
    if labels != router["spec"]["selector"]["matchLabels"]:
        problems.append("spec.selector: not the router Deployment's selector (would take in other pods)")
    http = [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if p.get("name") == "http"]
    if [p.get("number") for p in ports] != http:
        problems.append(f"spec.targetPorts: the routers serve HTTP on {http}, not {[p.get('number') for p in ports]}")
    return problems


def check_http_route(route: dict[str, Any], pool: dict[str, Any], gateway: str) -> list[str]:
    """Problems of an HTTPRoute (v1) meant to send `gateway`'s traffic to `pool`."""
    problems = only(route, {"apiVersion", "kind", "metadata", "spec"}, "")
    if (route.get("apiVersion"), route.get("kind")) != ("gateway.networking.k8s.io/v1", "HTTPRoute"):
        problems.append("not a gateway.networking.k8s.io/v1 HTTPRoute")
    spec = route.get("spec", {})
    problems += only(spec, {"parentRefs", "hostnames", "rules"}, "spec")
    parents = spec.get("parentRefs", [])
    if not 1 <= len(parents) <= 32:
        problems.append("spec.parentRefs: 1 to 32")
    for p in parents:
        problems += only(p, {"group", "kind", "namespace", "name", "sectionName", "port"}, "spec.parentRefs[]")
        if (p.get("group", "gateway.networking.k8s.io"), p.get("kind", "Gateway"), p.get("name")) != (
                "gateway.networking.k8s.io", "Gateway", gateway):
            problems.append(f"spec.parentRefs: not the Gateway {gateway}")
    hosts = spec.get("hostnames", [])
    if len(hosts) > 16 or any(not (isinstance(h, str) and len(h) <= 253 and HOSTNAME.match(h)) for h in hosts):
        problems.append("spec.hostnames: at most 16 hostnames")
    rules = spec.get("rules", [])
    if not 1 <= len(rules) <= 16:
        problems.append("spec.rules: 1 to 16")
    for rule in rules:
        problems += only(rule, {"name", "matches", "filters", "backendRefs", "timeouts"}, "spec.rules[]")
        for match in rule.get("matches", []):
            path = match.get("path", {})
            if path.get("type") not in ("Exact", "PathPrefix", "RegularExpression") or not str(
                    path.get("value", "")).startswith("/"):
                problems.append("spec.rules[].matches[].path: a type and a value starting with /")
        refs = rule.get("backendRefs", [])
        if not 1 <= len(refs) <= 16:
            problems.append("spec.rules[].backendRefs: 1 to 16")
        for ref in refs:
            problems += only(ref, {"group", "kind", "name", "namespace", "port", "weight", "filters"},
                             "spec.rules[].backendRefs[]")
            if "port" in ref:
                problems.append("spec.rules[].backendRefs[].port: an InferencePool backend takes none")
            if not 0 <= ref.get("weight", 1) <= 1_000_000:
                problems.append("spec.rules[].backendRefs[].weight: 0..1000000")
            if (ref.get("group"), ref.get("kind"), ref.get("name")) != (
                    "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"]):
                problems.append("spec.rules[].backendRefs: not the InferencePool")
            if ref.get("namespace", route["metadata"]["namespace"]) != pool["metadata"]["namespace"]:
                problems.append("spec.rules[].backendRefs: the pool is in another namespace")
    return problems


def spec(**gateway: Any) -> K2DeploymentSpec:
    return K2DeploymentSpec.model_validate({"router": {"httpPort": 8080, "gateway": {
        "name": "inference-gw", "endpointPicker": {"name": "k2-epp"}, **gateway}}})


def rendered(s: K2DeploymentSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pool, route = render_gateway(NAME, NS, s)
    return pool, route, render_router_deployment(NAME, NS, s)


def test_rendered_pool_and_route_pass_the_v1_field_checks() -> None:
    pool, route, router = rendered(spec(namespace="gateways", sectionName="https", hostnames=["llm.example.com"]))
    assert check_inference_pool(pool, router) == []
    assert check_http_route(route, pool, "inference-gw") == []
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "k2-epp",
                                                 "portNumber": 9002, "failureMode": "FailClose"}
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gw", "namespace": "gateways", "sectionName": "https"}]
    assert route["spec"]["rules"][0]["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]


@pytest.mark.parametrize(("break_it", "caught"), [
    (lambda p, r: p["spec"]["targetPorts"][0].update(number=8000), "the routers serve HTTP on [8080]"),
    (lambda p, r: p["spec"]["targetPorts"].append({"number": 50051}), "exactly one"),
    (lambda p, r: p["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "worker"}),
     "does not select the router pods"),
    (lambda p, r: p["spec"]["selector"]["matchLabels"].pop("app.kubernetes.io/instance"),
     "not the router Deployment's selector"),
    (lambda p, r: p["spec"]["endpointPickerRef"].update(failureMode="Retry"), "FailOpen or FailClose"),
    (lambda p, r: p["spec"].update(appProtocol="http"), "spec.appProtocol: not a field"),
])
def test_a_wrong_port_or_selector_in_the_pool_is_caught(break_it: Any, caught: str) -> None:
    pool, _, router = rendered(spec())
    bad = copy.deepcopy(pool)
    break_it(bad, router)
    assert any(caught in p for p in check_inference_pool(bad, router)), check_inference_pool(bad, router)


@pytest.mark.parametrize(("break_it", "caught"), [
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(port=8080), "takes none"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(name="other"), "not the InferencePool"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(kind="Service"), "not the InferencePool"),
    (lambda r: r["spec"]["parentRefs"][0].update(name="elsewhere"), "not the Gateway inference-gw"),
    (lambda r: r["spec"]["rules"][0]["matches"][0]["path"].update(type="Prefix"), "a type and a value"),
])
def test_a_wrong_backend_or_parent_in_the_route_is_caught(break_it: Any, caught: str) -> None:
    pool, route, _ = rendered(spec())
    bad = copy.deepcopy(route)
    break_it(bad)
    assert any(caught in p for p in check_http_route(bad, pool, "inference-gw"))


def test_no_gateway_children_without_a_gateway_or_without_the_apis() -> None:
    plain = K2DeploymentSpec()
    assert render_gateway(NAME, NS, plain) == []
    kinds = {c["kind"] for c in render_children(NAME, NS, spec(), service_monitor=False)}
    assert not kinds & {"InferencePool", "HTTPRoute"}  # the cluster does not serve them: not rendered
    kinds = {c["kind"] for c in render_children(NAME, NS, spec(), service_monitor=False, gateway_api=True)}
    assert {"InferencePool", "HTTPRoute"} <= kinds


@pytest.mark.parametrize(("gateway", "field"), [
    ({"name": "gw"}, "endpointPicker"),
    ({"name": "gw", "endpointPicker": {"name": "Bad_Name"}}, "endpointPicker.name"),
    ({"name": "gw", "endpointPicker": {"name": "epp", "portNumber": 70000}}, "endpointPicker.portNumber"),
    ({"name": "gw", "endpointPicker": {"name": "epp", "failureMode": "Retry"}}, "endpointPicker.failureMode"),
])
def test_bad_gateway_specs_are_refused_naming_the_field(gateway: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"router.gateway.{field}")):
        K2DeploymentSpec.model_validate({"router": {"gateway": gateway}})
