"""spec.router.gateway → the Gateway API children: an `InferencePool` (Gateway API Inference Extension,
inference.networking.k8s.io/v1) whose members are the router pods on their HTTP port, and an `HTTPRoute`
(Gateway API, gateway.networking.k8s.io/v1) attaching it to the named Gateway for the OpenAI API's `/v1` paths
(health and metrics stay inside the cluster). Pure, like render.py."""

from __future__ import annotations

from typing import Any

from k2serve.operator import pods
from k2serve.operator.kube import HTTPROUTE, INFERENCEPOOL
from k2serve.operator.spec import GatewaySpec, K2DeploymentSpec

API_PATH = "/v1"


def pool_name(name: str) -> str:
    return pods.router_name(name)


def render_inference_pool(name: str, namespace: str, spec: K2DeploymentSpec, gateway: GatewaySpec) -> dict[str, Any]:
    epp = gateway.endpoint_picker
    return {
        "apiVersion": INFERENCEPOOL.api_version,
        "kind": INFERENCEPOOL.kind,
        "metadata": pods.metadata(name, namespace, pool_name(name), "router"),
        "spec": {
            "selector": {"matchLabels": pods.selector(name, "router")},  # the router Deployment's pods
            "targetPorts": [{"number": spec.router.http_port}],
            "endpointPickerRef": {"group": "", "kind": "Service", "name": epp.name, "portNumber": epp.port_number,
                                  "failureMode": epp.failure_mode},
        },
    }


def render_http_route(name: str, namespace: str, gateway: GatewaySpec) -> dict[str, Any]:
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    if gateway.section_name:
        parent["sectionName"] = gateway.section_name
    route_spec: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": API_PATH}}],
            # An InferencePool backend takes no port: the pool's targetPorts say where its pods listen.
            "backendRefs": [{"group": INFERENCEPOOL.group, "kind": INFERENCEPOOL.kind, "name": pool_name(name)}],
        }],
    }
    if gateway.hostnames:
        route_spec["hostnames"] = list(gateway.hostnames)
    return {
        "apiVersion": HTTPROUTE.api_version,
        "kind": HTTPROUTE.kind,
        "metadata": pods.metadata(name, namespace, pods.router_name(name), "router"),
        "spec": route_spec,
    }


def render_gateway(name: str, namespace: str, spec: K2DeploymentSpec) -> list[dict[str, Any]]:
    """The two children when spec.router.gateway names a Gateway; none otherwise."""
    gateway = spec.router.gateway
    if gateway is None:
        return []
    return [render_inference_pool(name, namespace, spec, gateway), render_http_route(name, namespace, gateway)]
