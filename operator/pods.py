"""Pieces shared by every pod the operator renders: names, labels, security, volumes, scheduling, and the
serving config they all read. Pure functions of the spec."""

from __future__ import annotations

from typing import Any

from k2serve.config import CACHE_ENV, CONFIG_ENV, ChainStoreConfig, PoolConfig, RouterConfig, ServingConfig
from k2serve.download import HubSource, is_hub_source
from k2serve.operator.spec import K2DeploymentSpec, PoolSpec, Resources

CONFIG_DIR = "/etc/k2serve"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
API_KEYS_DIR = "/etc/k2serve/api-keys"
MODEL_DIR = "/models"
CHAINS_DIR = "/var/lib/k2serve"
CACHE_DIR = "/var/cache/k2serve"  # the builtin model is built here, per pod (an emptyDir: roots are read-only)
# KubeRay adds a port named "metrics" (Ray's own, 8080) to every Ray container; ours must differ, and the chart's
# PodMonitor scrapes exactly this name.
METRICS_PORT_NAME = "k2-metrics"
REDIS_URL_ENV = "K2SERVE_REDIS_URL"
CLUSTER_TOKEN_DIR = "/var/run/secrets/k2serve/cluster"
CLUSTER_TOKEN_KEY = "token"
RAY_AUTH_KEY = "auth_token"  # KubeRay's key for Ray's own token (authOptions.secretName names this Secret)
POOLS = ("prefill", "decode")


def config_name(name: str) -> str:
    return f"{name}-config"


def router_name(name: str) -> str:
    return f"{name}-router"


def ray_name(name: str) -> str:
    return f"{name}-ray"


def cluster_token_name(name: str) -> str:
    """The Secret holding the internal gRPC token (created once by the reconciler, owned by the K2Deployment)."""
    return f"{name}-cluster-token"


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "k2serve",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "k2serve-operator",
    }


def selector(name: str, component: str) -> dict[str, str]:
    """The immutable subset of labels used in selectors."""
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": component}


def ray_resource(pool: str) -> str:
    return f"k2serve_{pool}"


def _pool_config(pool: str, spec: PoolSpec) -> PoolConfig:
    fields = spec.model_dump(include=set(PoolConfig.model_fields))
    fields["ray_resources"] = {**spec.ray_resources, ray_resource(pool): 1.0}
    return PoolConfig.model_validate(fields)


def serving_config(spec: K2DeploymentSpec) -> ServingConfig:
    """What router and workers read from the ConfigMap: the CR's serving knobs with in-pod paths and ports."""
    model = spec.model.model_dump(include=set(ServingConfig.model_fields["model"].annotation.model_fields))
    if is_hub_source(spec.model.source):  # the download Job's folder for this revision
        model["source"] = f"{MODEL_DIR}/{HubSource.parse(spec.model.source).folder}"
    elif spec.model.pvc and not spec.model.source.startswith(("builtin:", "/")) and "://" not in spec.model.source:
        model["source"] = f"{MODEL_DIR}/{spec.model.source}"
    r = spec.router
    router = RouterConfig(
        **r.model_dump(include=set(RouterConfig.model_fields)), host="0.0.0.0",
        api_keys_file=f"{API_KEYS_DIR}/{r.api_key_secret.key}" if r.api_key_secret else None,
    )
    store = spec.chain_store.model_dump(include=set(ChainStoreConfig.model_fields))
    if spec.chain_store.backend == "sqlite":  # on the router's chains volume: its working directory is read-only
        store["sqlite_path"] = f"{CHAINS_DIR}/{spec.chain_store.sqlite_path}"
    if spec.chain_store.redis_url_secret:
        store["redis_url_env"] = REDIS_URL_ENV
    return ServingConfig(
        model=model, prefill=_pool_config("prefill", spec.prefill), decode=_pool_config("decode", spec.decode),
        router=router, chain_store=ChainStoreConfig.model_validate(store), deterministic=spec.deterministic,
        # Ranks run in worker pods the head pod's controller cannot see the cores of (they may not have joined
        # when it plans): pods get their cores from their CPU requests and the kubelet's CPU manager instead.
        cpu_binding="none",
        cluster_token_file=f"{CLUSTER_TOKEN_DIR}/{CLUSTER_TOKEN_KEY}",
    )


def resources(res: Resources) -> dict[str, Any]:
    return {k: v for k, v in {"requests": res.requests, "limits": res.limits}.items() if v}


def container_security(read_only_root: bool) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security() -> dict[str, Any]:
    """The pod-level part of every pod's spec: a non-root identity, and no Kubernetes API token (nothing the
    operator renders talks to the API server)."""
    return {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
            "automountServiceAccountToken": False}


def env(spec: K2DeploymentSpec, *, chain_store: bool = False) -> list[dict[str, Any]]:
    """`chain_store`: the container opens the chain store (the router), so it gets the redis URL Secret."""
    out: list[dict[str, Any]] = [{"name": CONFIG_ENV, "value": CONFIG_PATH}, {"name": CACHE_ENV, "value": CACHE_DIR}]
    if (ref := spec.chain_store.redis_url_secret) and chain_store:
        out.append({"name": REDIS_URL_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return out


def volumes(name: str, spec: K2DeploymentSpec, *, shm_size: str | None = None) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the config and the internal gRPC token, /tmp and the model cache (read-only
    roots), and the model, store, keys and shm when used."""
    token = {"secretName": cluster_token_name(name), "items": [{"key": CLUSTER_TOKEN_KEY, "path": CLUSTER_TOKEN_KEY}]}
    vols: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": config_name(name)}},
                                  {"name": "cluster-token", "secret": token},
                                  {"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                    {"name": "cluster-token", "mountPath": CLUSTER_TOKEN_DIR, "readOnly": True},
                                    {"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    if spec.model.pvc:
        vols.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    if shm_size:
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return vols, mounts


def ray_auth_env(name: str) -> list[dict[str, Any]]:
    """What a Ray driver outside KubeRay's Ray container needs to pass Ray's token auth (KubeRay injects the same
    into the Ray containers)."""
    ref = {"secretKeyRef": {"name": cluster_token_name(name), "key": RAY_AUTH_KEY}}
    return [{"name": "RAY_AUTH_MODE", "value": "token"}, {"name": "RAY_AUTH_TOKEN", "valueFrom": ref}]


def scheduling(spec: K2DeploymentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.affinity:
        out["affinity"] = spec.affinity
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out


def metadata(name: str, namespace: str, child: str, component: str) -> dict[str, Any]:
    return {"name": child, "namespace": namespace, "labels": labels(name, component)}
