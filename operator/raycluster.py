"""spec → the KubeRay `RayCluster` (ray.io/v1): a head group running the pool controller, and one worker
group per pool whose pods each host one Ray actor (one GPU) and advertise the pool's custom resource."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from k2serve.config import LEADER_CPUS, POOL_METRICS_PORT
from k2serve.operator import pods
from k2serve.operator.spec import K2DeploymentSpec, PoolSpec

GPU = "nvidia.com/gpu"


def worker_group_name(pool: str) -> str:
    return f"{pool}-workers"


def _worker_resources(pool: PoolSpec) -> dict[str, Any]:
    res = pods.resources(pool.resources)
    gpus = math.ceil(pool.num_gpus_per_actor)
    if gpus and GPU not in res.get("limits", {}):
        res.setdefault("limits", {})[GPU] = str(gpus)
    return res


def _worker_group(name: str, spec: K2DeploymentSpec, pool: str, pool_spec: PoolSpec, groups: int,
                  remove: list[str] | None) -> dict[str, Any]:
    ep = pool_spec.expert_parallel
    replicas = groups * ep
    scaling = pool_spec.autoscaling
    vols, mounts = pods.volumes(name, spec, shm_size=pool_spec.shm_size)
    # An autoscaled pool names the pods to remove when it shrinks (idle ones); KubeRay would pick at random.
    strategy = {"scaleStrategy": {"workersToDelete": remove}} if remove is not None else {}
    return {
        "groupName": worker_group_name(pool),
        **strategy,
        "replicas": replicas,
        "minReplicas": scaling.min_groups * ep if scaling else replicas,
        "maxReplicas": scaling.max_groups * ep if scaling else replicas,
        "rayStartParams": {
            # KubeRay pastes this into a bash line (`--resources='{...}'`) and also parses it itself after
            # trimming quotes, so: single-quoted JSON. The pool controller asks for it per actor.
            "resources": f"'{json.dumps({pods.ray_resource(pool): 1}, separators=(',', ':'))}'",
            # One rank plus room for a group leader, which Ray may place on any worker pod.
            "num-cpus": str(math.ceil(pool_spec.num_cpus_per_actor + LEADER_CPUS)),
        },
        "template": {
            "metadata": {"labels": {**pods.labels(name, "worker"), "k2serve.io/pool": pool}},
            "spec": {
                **pods.pod_security(),
                "containers": [{
                    "name": "ray-worker",
                    "image": spec.ray.image or spec.image,
                    "imagePullPolicy": spec.image_pull_policy,
                    "env": [*pods.env(spec), {"name": "K2SERVE_POOL", "value": pool}],
                    "resources": _worker_resources(pool_spec),
                    "volumeMounts": mounts,
                    # Ray writes session files and spills under /tmp and $HOME; the root stays writable.
                    "securityContext": pods.container_security(read_only_root=False),
                }],
                "volumes": vols,
                **pods.scheduling(spec),
            },
        },
    }


def _head_group(name: str, spec: K2DeploymentSpec) -> dict[str, Any]:
    vols, mounts = pods.volumes(name, spec)
    image = spec.ray.image or spec.image
    controller_cmd = ["k2serve", "pools", "--config", pods.CONFIG_PATH, "--wait-for-ray", "300",
                      "--metrics-port", str(POOL_METRICS_PORT), "--metrics-host", "0.0.0.0"]
    if any((a := getattr(spec, pool).autoscaling) is not None and a.ttft_slo_s is not None for pool in pods.POOLS):
        # A pool scaled on TTFT reads the routers' (through their Service: one router's histogram per reading).
        controller_cmd += ["--router-metrics", f"http://{pods.router_name(name)}:{spec.router.http_port}/metrics"]
    return {
        "serviceType": "ClusterIP",
        # No CPUs for tasks on the head: actors of the pools must land on worker pods. The dashboard answers
        # inside the pod only: nothing here needs it from outside (KubeRay's probes query the dashboard agent).
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "127.0.0.1"},
        "template": {
            "metadata": {"labels": pods.labels(name, "head")},
            "spec": {
                **pods.pod_security(),
                # The pool controller is a Ray driver: ray.init finds its node by looking for the raylet among
                # the processes it can see, which in a pod of separate PID namespaces is none.
                "shareProcessNamespace": True,
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "imagePullPolicy": spec.image_pull_policy,
                        "env": pods.env(spec),
                        "resources": pods.resources(spec.ray.head_resources),
                        "ports": [{"containerPort": 6379, "name": "gcs"},
                                  {"containerPort": 10001, "name": "client"}],
                        "volumeMounts": mounts,
                        "securityContext": pods.container_security(read_only_root=False),
                    },
                    {
                        # The pool controller is a Ray driver next to the head (same pod network): it keeps
                        # the desired prefill/decode groups alive, publishes their gRPC addresses and serves
                        # their metrics, merged, on the port the chart's PodMonitor scrapes.
                        "name": "pool-controller",
                        "image": image,
                        "imagePullPolicy": spec.image_pull_policy,
                        "command": controller_cmd,
                        "ports": [{"containerPort": POOL_METRICS_PORT, "name": pods.METRICS_PORT_NAME, "protocol": "TCP"}],
                        "env": [*pods.env(spec), *pods.ray_auth_env(name),
                                {"name": "RAY_ADDRESS", "value": "127.0.0.1:6379"}],
                        "volumeMounts": mounts,
                        "securityContext": pods.container_security(read_only_root=True),
                    },
                ],
                "volumes": vols,
                **pods.scheduling(spec),
            },
        },
    }


def _gcs_fault_tolerance(spec: K2DeploymentSpec) -> dict[str, Any] | None:
    ft = spec.ray.gcs_fault_tolerance
    if ft is None:
        return None
    out: dict[str, Any] = {"redisAddress": ft.redis_address}
    if ref := ft.redis_password_secret:
        out["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    return out


def render_raycluster(name: str, namespace: str, spec: K2DeploymentSpec, groups: Mapping[str, int] | None = None,
                      remove: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """`groups`: each pool's group count now (autoscaling.pool_groups), default: the spec's `groups`; `remove`:
    the pods each autoscaled pool gives up first (autoscaling.surplus_pods)."""
    ray_spec: dict[str, Any] = {
        "rayVersion": spec.ray.ray_version,
        "enableInTreeAutoscaling": False,
        # Ray's token auth (KubeRay >= 1.6, Ray >= 2.52): KubeRay gives every Ray container the token of this
        # Secret (key auth_token); the pool controller and the routers get it from pods.ray_auth_env.
        "authOptions": {"mode": "token", "secretName": pods.cluster_token_name(name)},
        "headGroupSpec": _head_group(name, spec),
        "workerGroupSpecs": [_worker_group(name, spec, pool, getattr(spec, pool),
                                           groups[pool] if groups else getattr(spec, pool).groups,
                                           (remove or {}).get(pool))
                             for pool in pods.POOLS],
    }
    if ft := _gcs_fault_tolerance(spec):
        ray_spec["gcsFaultToleranceOptions"] = ft
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": pods.metadata(name, namespace, pods.ray_name(name), "ray"),
        "spec": ray_spec,
    }
