"""What the KubeRay operator makes of a `RayCluster` (ray.io/v1): the head pod, the worker pods and the head
Service, built the way KubeRay's `ray-operator/controllers/ray/common/pod.go` builds them (BuildPod,
DefaultHeadPodTemplate, DefaultWorkerPodTemplate, setMissingRayStartParams, generateRayStartCommand,
setContainerEnvVars, initLivenessAndReadinessProbe) and `service.go` (the head Service). Pure: dicts in, dicts out.

Only what the operator's RayClusters use is modelled (token auth from a given Secret; no autoscaler, GCS FT, TLS
or RayService);
anything else in the spec raises, so a new field is noticed rather than silently dropped.
"""

from __future__ import annotations

import copy
import math
import secrets
from typing import Any

# KubeRay's defaults (ray-operator/controllers/ray/utils/constant.go).
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
METRICS_PORT = 8080  # added as a port named "metrics" to every Ray container that has none of that name
AGENT_PORT = 52365  # the dashboard agent, which the probes query
# Ray >= 2.53 has one HTTP health endpoint on the dashboard agent, which KubeRay probes instead of its wget lines.
NODE_HEALTH_PATH = "/api/healthz"
READINESS = {"initialDelaySeconds": 10, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 10}
LIVENESS = {"initialDelaySeconds": 30, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 120}
CONTAINER_COMMAND = ["/bin/bash", "-lc", "--"]  # utils.GetContainerCommand
SUPPORTED_SPEC = {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs", "authOptions"}
BOOLEAN_VALUED = {"log-color", "include-dashboard", "include-log-monitor"}  # passed as --flag=false too


def head_service_name(cluster: str) -> str:
    return f"{cluster}-head-svc"


def _labels(cluster: str, node_type: str, group: str, template_labels: dict[str, str]) -> dict[str, str]:
    out = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
           "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
           "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    protected = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    out.update({k: v for k, v in template_labels.items() if k not in protected})
    return out


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


def _params_to_flags(params: dict[str, str]) -> str:
    """convertParamMap: sorted; "true" is a bare switch, "false" is dropped (but for a few flags), else --k=v."""
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in BOOLEAN_VALUED:
            if value.lower() == "true":
                flags += f" --{key} "
        else:
            flags += f" --{key}={value} "
    return flags


def _ray_start(node_type: str, params: dict[str, str], resources: dict[str, Any]) -> str:
    """generateRayStartCommand: num-cpus and memory from the container's limits (else requests) when unset."""
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params and (cpu := limits.get("cpu") or requests.get("cpu")):
        params["num-cpus"] = str(int(_quantity(cpu)))
    if "memory" not in params and (memory := limits.get("memory")):
        params["memory"] = str(int(_quantity(memory)))
    gpus = {k: v for k, v in limits.items() if k.endswith("gpu")}
    if "num-gpus" not in params and gpus:
        params["num-gpus"] = str(int(_quantity(next(iter(gpus.values())))))
    head = " --head" if node_type == "head" else ""
    return f"ray start{head} {_params_to_flags(params)}"


def _probe(base: dict[str, int], timeout_s: int, port: int) -> dict[str, Any]:
    return {**base, "timeoutSeconds": timeout_s, "httpGet": {"path": NODE_HEALTH_PATH, "port": port}}


def _env(container: dict[str, Any], node_type: str, fqdn: str, start_cmd: str) -> None:
    """setContainerEnvVars."""
    env = container.setdefault("env", [])
    names = {e["name"] for e in env}
    ip = "127.0.0.1" if node_type == "head" else fqdn
    if node_type == "worker":
        env += [{"name": "FQ_RAY_IP", "value": fqdn}, {"name": "RAY_IP", "value": fqdn.split(".")[0]}]
    env += [
        {"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
        {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start_cmd},
    ]
    defaults = [("RAY_PORT", str(GCS_PORT)), ("RAY_ADDRESS", f"{ip}:{GCS_PORT}"), ("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")]
    env += [{"name": k, "value": v} for k, v in defaults if k not in names]
    if node_type == "head":
        env.append({"name": "RAY_USAGE_STATS_EXTRA_TAGS", "value": "kuberay_version=harness;kuberay_crd=RayCluster"})
    if "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE" not in names:
        env.append({"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"})


def _token_auth(raycluster: dict[str, Any], container: dict[str, Any]) -> None:
    """SetContainerTokenAuthEnvVars: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret's auth_token key."""
    options = raycluster["spec"].get("authOptions")
    if not options:
        return
    if options.get("mode") != "token" or "secretName" not in options:
        raise ValueError(f"authOptions the harness does not model: {options}")
    env = container.setdefault("env", [])
    names = {e["name"] for e in env}
    ref = {"secretKeyRef": {"name": options["secretName"], "key": "auth_token"}}
    env += [e for e in ({"name": "RAY_AUTH_MODE", "value": "token"}, {"name": "RAY_AUTH_TOKEN", "valueFrom": ref})
            if e["name"] not in names]


def _wait_gcs_init(ray_container: dict[str, Any], fqdn: str) -> dict[str, Any]:
    """The init container KubeRay injects into worker pods: `ray health-check` against the head until it answers."""
    script = (f"SECONDS=0; while true; do if ray health-check --address {fqdn}:{GCS_PORT} > /dev/null 2>&1; "
              f"then echo 'GCS is ready.'; break; fi; echo \"$SECONDS seconds elapsed: Waiting for GCS to be ready.\"; "
              "sleep 5; done")
    return {"name": "wait-gcs-ready", "image": ray_container["image"], "command": list(CONTAINER_COMMAND),
            "args": [script], "securityContext": copy.deepcopy(ray_container.get("securityContext", {})),
            "env": copy.deepcopy(ray_container.get("env", [])) + [{"name": "FQ_RAY_IP", "value": fqdn},
                                                                   {"name": "RAY_IP", "value": fqdn.split(".")[0]}],
            "volumeMounts": copy.deepcopy(ray_container.get("volumeMounts", [])),
            "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}, "requests": {"cpu": "200m", "memory": "256Mi"}}}


def build_pod(raycluster: dict[str, Any], node_type: str, group: dict[str, Any]) -> dict[str, Any]:
    """One Ray pod of `group` (the headGroupSpec or a workerGroupSpecs entry), as KubeRay would create it."""
    unknown = set(raycluster["spec"]) - SUPPORTED_SPEC
    if unknown:
        raise ValueError(f"RayCluster fields the harness does not model: {sorted(unknown)}")
    if raycluster["spec"].get("enableInTreeAutoscaling"):
        raise ValueError("the harness does not model KubeRay's autoscaler sidecar")
    cluster, namespace = raycluster["metadata"]["name"], raycluster["metadata"]["namespace"]
    fqdn = f"{head_service_name(cluster)}.{namespace}.svc.cluster.local"
    template = copy.deepcopy(group["template"])
    spec = template["spec"]
    group_name = "headgroup" if node_type == "head" else group["groupName"]
    suffix = secrets.token_hex(3)[:5]
    name = f"{cluster}-head-{suffix}" if node_type == "head" else f"{cluster}-{group_name}-worker-{suffix}"
    labels = _labels(cluster, node_type, group_name, template.get("metadata", {}).get("labels", {}))
    params = dict(group.get("rayStartParams", {}))
    if node_type == "worker":
        params.setdefault("address", f"{fqdn}:{GCS_PORT}")
        spec["initContainers"] = [*spec.get("initContainers", []), _wait_gcs_init(spec["containers"][0], fqdn)]
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    ray = spec["containers"][0]  # KubeRay: the Ray container is the first one
    if not any(m["mountPath"] == "/dev/shm" for m in ray.get("volumeMounts", [])):
        spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {"medium": "Memory"}})
        ray.setdefault("volumeMounts", []).append({"name": "shared-mem", "mountPath": "/dev/shm"})
    if not any(p.get("name") == "metrics" for p in ray.get("ports", [])):
        ray.setdefault("ports", []).append({"name": "metrics", "containerPort": METRICS_PORT})
    start_cmd = _ray_start(node_type, params, ray.get("resources", {}))
    generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start_cmd}"
    user_cmd = "".join(f" {w} " for w in ray.get("command", []) + ray.get("args", []))
    if "ray start" not in user_cmd:
        ray["command"] = list(CONTAINER_COMMAND)
        ray["args"] = [f"{user_cmd} && {generated}" if user_cmd else generated]
    _env(ray, node_type, fqdn, start_cmd)
    for container in [ray, *(c for c in spec.get("initContainers", []) if c["name"] == "wait-gcs-ready")]:
        _token_auth(raycluster, container)
    head_timeout = 5 if node_type == "head" else 1
    ray.setdefault("livenessProbe", _probe(LIVENESS, head_timeout, int(params["dashboard-agent-listen-port"])))
    ray.setdefault("readinessProbe", _probe(READINESS, head_timeout, int(params["dashboard-agent-listen-port"])))
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "annotations": dict(template.get("metadata", {}).get("annotations", {}))},
            "spec": spec}


def head_service(raycluster: dict[str, Any]) -> dict[str, Any]:
    """service.go: the head Service exposes the head's named container ports (gcs, dashboard, client, metrics)."""
    cluster = raycluster["metadata"]["name"]
    ray = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in ray.get("ports", [])}
    ports = {"gcs": GCS_PORT, "dashboard": DASHBOARD_PORT, "client": CLIENT_PORT, "metrics": METRICS_PORT, **ports}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": head_service_name(cluster), "namespace": raycluster["metadata"]["namespace"]},
            "spec": {"selector": {"ray.io/cluster": cluster, "ray.io/node-type": "head"},
                     "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()]}}


def desired_pods(raycluster: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], int]]:
    """group name -> (node type, group spec, replicas) for every group KubeRay keeps populated."""
    out: dict[str, tuple[str, dict[str, Any], int]] = {"headgroup": ("head", raycluster["spec"]["headGroupSpec"], 1)}
    for group in raycluster["spec"].get("workerGroupSpecs", []):
        replicas = group.get("replicas", group.get("minReplicas", 0)) * group.get("numOfHosts", 1)
        out[group["groupName"]] = ("worker", group, int(math.floor(replicas)))
    return out
