"""spec → every child manifest of a K2Deployment. Pure: no API calls, so it is tested without a server;
owner references are added by the reconciler (kopf.adopt)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from k2serve.config import POOL_METRICS_PORT
from k2serve.operator import pods
from k2serve.operator.gateway import render_gateway
from k2serve.operator.raycluster import render_raycluster
from k2serve.operator.spec import K2DeploymentSpec


ROUTER_STARTUP_S = 600


def render_configmap(name: str, namespace: str, spec: K2DeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": pods.metadata(name, namespace, pods.config_name(name), "config"),
        "data": {"config.yaml": pods.serving_config(spec).to_yaml()},
    }


def render_cluster_token(name: str, namespace: str, token: str, ray_token: str) -> dict[str, Any]:
    """The Secret of the internal gRPC token and of Ray's token auth. Not among `render_children`: its values are
    random, so the reconciler creates it once and never patches it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": pods.metadata(name, namespace, pods.cluster_token_name(name), "config"),
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode()
                 for key, value in ((pods.CLUSTER_TOKEN_KEY, token), (pods.RAY_AUTH_KEY, ray_token))},
    }


def render_router_deployment(name: str, namespace: str, spec: K2DeploymentSpec) -> dict[str, Any]:
    r = spec.router
    vols, mounts = pods.volumes(name, spec)
    if r.api_key_secret:
        vols.append({"name": "api-keys", "secret": {"secretName": r.api_key_secret.name}})
        mounts.append({"name": "api-keys", "mountPath": pods.API_KEYS_DIR, "readOnly": True})
    if spec.chain_store.backend == "sqlite":
        # Without a claim the chains live as long as the pod (an emptyDir); a PVC keeps them across restarts.
        source = ({"persistentVolumeClaim": {"claimName": spec.chain_store.pvc}} if spec.chain_store.pvc
                  else {"emptyDir": {}})
        vols.append({"name": "chains", **source})
        mounts.append({"name": "chains", "mountPath": pods.CHAINS_DIR})
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "router",
        "image": r.image or spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "k2serve.router.process", "--config", pods.CONFIG_PATH],
        # The router finds the worker groups in the pool controller's registry, over Ray Client to the head.
        "env": [*pods.env(spec, chain_store=True), *pods.ray_auth_env(name), {"name": "RAY_ADDRESS", "value": f"ray://{pods.ray_name(name)}-head-svc:10001"}],
        "ports": [{"name": "http", "containerPort": r.http_port, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": r.grpc_port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        # Before it listens the router joins Ray (which may not be up yet) and builds or loads the tokenizer's
        # model folder: liveness starts counting only once it answered, up to STARTUP_S after the start.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": ROUTER_STARTUP_S // 5},
        "resources": pods.resources(r.resources),
        "volumeMounts": mounts,
        "securityContext": pods.container_security(read_only_root=True),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": pods.metadata(name, namespace, pods.router_name(name), "router"),
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": pods.selector(name, "router")},
            "template": {
                "metadata": {"labels": pods.labels(name, "router")},
                "spec": {
                    **pods.pod_security(),
                    "containers": [container],
                    "volumes": vols,
                    **pods.scheduling(spec),
                },
            },
        },
    }


def render_router_service(name: str, namespace: str, spec: K2DeploymentSpec) -> dict[str, Any]:
    r = spec.router
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": pods.metadata(name, namespace, pods.router_name(name), "router"),
        "spec": {
            "type": "ClusterIP",
            "selector": pods.selector(name, "router"),
            "ports": [{"name": "http", "port": r.http_port, "targetPort": "http", "protocol": "TCP"},
                      {"name": "grpc", "port": r.grpc_port, "targetPort": "grpc", "protocol": "TCP",
                       "appProtocol": "grpc"}],
        },
    }


def render_pdbs(name: str, namespace: str) -> list[dict[str, Any]]:
    """The router keeps one replica through voluntary disruptions; worker pods go one at a time, because one
    evicted pod takes its whole expert-parallel group down."""
    ray_selector = {"ray.io/cluster": pods.ray_name(name), "ray.io/node-type": "worker"}
    return [
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": pods.metadata(name, namespace, pods.router_name(name), "router"),
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pods.selector(name, "router")}}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": pods.metadata(name, namespace, f"{name}-workers", "worker"),
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": ray_selector}}},
    ]


def _ingress_policy(name: str, namespace: str, child: str, component: str, pods_selected: dict[str, str],
                    ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": pods.metadata(name, namespace, child, component),
            "spec": {"podSelector": {"matchLabels": pods_selected}, "policyTypes": ["Ingress"], "ingress": ingress}}


def render_network_policy(name: str, namespace: str) -> dict[str, Any]:
    """Ray pods accept traffic only from their own cluster's pods (Ray's internal ports) and the routers
    (worker gRPC), plus scrapes of the pool controller's metrics port from anywhere (where Prometheus runs is
    the cluster's business): nothing else in the cluster reaches the workers."""
    cluster = {"ray.io/cluster": pods.ray_name(name)}
    peers = [{"podSelector": {"matchLabels": cluster}},
             {"podSelector": {"matchLabels": pods.selector(name, "router")}}]
    return _ingress_policy(name, namespace, f"{name}-workers", "worker", cluster,
                           [{"from": peers}, {"ports": [{"protocol": "TCP", "port": POOL_METRICS_PORT}]}])


def render_router_network_policy(name: str, namespace: str, spec: K2DeploymentSpec) -> dict[str, Any]:
    """Router pods accept their two client surfaces (OpenAI HTTP with /metrics, and gRPC) from anywhere, and
    nothing else: they need no inbound traffic from the Ray pods (routers call the groups, not the reverse)."""
    ports = [{"protocol": "TCP", "port": spec.router.http_port}, {"protocol": "TCP", "port": spec.router.grpc_port}]
    return _ingress_policy(name, namespace, pods.router_name(name), "router", pods.selector(name, "router"),
                           [{"ports": ports}])


def render_service_monitor(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": pods.metadata(name, namespace, pods.router_name(name), "router"),
        "spec": {
            "selector": {"matchLabels": pods.selector(name, "router")},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def render_children(name: str, namespace: str, spec: K2DeploymentSpec, *, service_monitor: bool,
                    groups: Mapping[str, int] | None = None, remove: Mapping[str, list[str]] | None = None,
                    gateway_api: bool = False) -> list[dict]:
    """Every child, in creation order (config before its readers); `groups`, `remove`: see render_raycluster;
    `gateway_api`: the cluster serves InferencePool and HTTPRoute (then spec.router.gateway renders them)."""
    children = [
        render_configmap(name, namespace, spec),
        render_raycluster(name, namespace, spec, groups, remove),
        render_router_deployment(name, namespace, spec),
        render_router_service(name, namespace, spec),
        *render_pdbs(name, namespace),
        render_network_policy(name, namespace),
        render_router_network_policy(name, namespace, spec),
    ]
    if service_monitor:
        children.append(render_service_monitor(name, namespace))
    if gateway_api:
        children += render_gateway(name, namespace, spec)
    return children
