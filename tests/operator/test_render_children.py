"""Pure rendering: every child validates against Kubernetes 1.33 schemas; the RayCluster against KubeRay v1."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from k2serve.config import LEADER_CPUS, POOL_METRICS_PORT, ServingConfig
from k2serve.operator.render import render_children
from k2serve.operator.spec import K2DeploymentSpec

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "manifests/samples").glob("*.yaml"))

# KubeRay ray.io/v1 fields we emit, written down from KubeRay's API reference
# (ray-project.github.io/kuberay/reference/api): field -> Python type of its JSON value.
RAYCLUSTER_SPEC = {"rayVersion": str, "enableInTreeAutoscaling": bool, "headGroupSpec": dict,
                   "workerGroupSpecs": list, "gcsFaultToleranceOptions": dict, "suspend": bool,
                   "autoscalerOptions": dict, "headServiceAnnotations": dict, "authOptions": dict}
HEAD_GROUP_SPEC = {"serviceType": str, "headService": dict, "enableIngress": bool, "rayStartParams": dict,
                   "template": dict}
WORKER_GROUP_SPEC = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                     "numOfHosts": int, "rayStartParams": dict, "template": dict, "scaleStrategy": dict,
                     "suspend": bool, "idleTimeoutSeconds": int}
GCS_FT_OPTIONS = {"redisAddress": str, "redisPassword": dict, "redisUsername": dict,
                  "externalStorageNamespace": str}
REQUIRED = {"headGroupSpec": ["rayStartParams", "template"], "workerGroupSpecs": ["groupName", "template"]}


def _spec(sample: Path) -> tuple[str, str, K2DeploymentSpec]:
    cr = yaml.safe_load(sample.read_text())
    return cr["metadata"]["name"], cr["metadata"]["namespace"], K2DeploymentSpec.model_validate(cr["spec"])


def _check_fields(obj: dict[str, Any], table: dict[str, type], where: str) -> None:
    for key, value in obj.items():
        assert key in table, f"{where}.{key} is not a KubeRay v1 field"
        assert isinstance(value, table[key]), f"{where}.{key} should be {table[key].__name__}"


def _pod_template(template: dict[str, Any]) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, "1.33.0", strict=True)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_child_validates(sample: Path) -> None:
    name, namespace, spec = _spec(sample)
    children = render_children(name, namespace, spec, service_monitor=True)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "RayCluster", "Deployment", "Service", "PodDisruptionBudget",
                     "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "ServiceMonitor"]
    for child in children:
        if child["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue  # not core: checked below against their own APIs
        kubernetes_validate.validate(child, "1.33.0", strict=True)
    ray = children[1]
    _check_fields(ray["spec"], RAYCLUSTER_SPEC, "spec")
    _check_fields(ray["spec"]["headGroupSpec"], HEAD_GROUP_SPEC, "spec.headGroupSpec")
    _pod_template(ray["spec"]["headGroupSpec"]["template"])
    for group in ray["spec"]["workerGroupSpecs"]:
        _check_fields(group, WORKER_GROUP_SPEC, "spec.workerGroupSpecs[]")
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams is map[string]string"
        _pod_template(group["template"])
    for part, keys in REQUIRED.items():
        groups = ray["spec"][part] if isinstance(ray["spec"][part], list) else [ray["spec"][part]]
        assert all(k in g for g in groups for k in keys)
    if "gcsFaultToleranceOptions" in ray["spec"]:
        _check_fields(ray["spec"]["gcsFaultToleranceOptions"], GCS_FT_OPTIONS, "spec.gcsFaultToleranceOptions")
    monitor = children[-1]
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_kimi_sample_worker_groups() -> None:
    name, namespace, spec = _spec(REPO / "manifests/samples/kimi-k2-thinking.yaml")
    ray = render_children(name, namespace, spec, service_monitor=False)[1]
    groups = {g["groupName"]: g for g in ray["spec"]["workerGroupSpecs"]}
    assert groups["prefill-workers"]["replicas"] == 1 * 16 and groups["decode-workers"]["replicas"] == 2 * 16
    decode = groups["decode-workers"]["template"]["spec"]
    assert decode["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in decode["volumes"]
    assert groups["decode-workers"]["rayStartParams"]["resources"] == """'{"k2serve_decode":1}'"""
    assert decode["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert decode["priorityClassName"] == "k2serve-inference"
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert head[1]["command"] == ["k2serve", "pools", "--config", "/etc/k2serve/config.yaml", "--wait-for-ray", "300",
                                  "--metrics-port", str(POOL_METRICS_PORT), "--metrics-host", "0.0.0.0"]
    # The chart's PodMonitor scrapes ports named "k2-metrics" (KubeRay names Ray's own port "metrics"): the
    # controller's serves every group's metrics.
    assert head[1]["ports"] == [{"containerPort": POOL_METRICS_PORT, "name": "k2-metrics", "protocol": "TCP"}]
    assert ray["spec"]["gcsFaultToleranceOptions"]["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "k2serve-redis", "key": "password"}}}


def test_configmap_holds_the_serving_config_router_and_workers_read() -> None:
    name, namespace, spec = _spec(REPO / "manifests/samples/kimi-k2-thinking.yaml")
    children = render_children(name, namespace, spec, service_monitor=False)
    config = ServingConfig.model_validate(yaml.safe_load(children[0]["data"]["config.yaml"]))
    assert config.model.source == "/models/Kimi-K2-Thinking" and config.model.quantization == "int4"
    assert config.decode.expert_parallel == 16 and config.decode.ray_resources == {"k2serve_decode": 1.0}
    assert (config.router.host, config.router.http_port, config.router.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert config.router.api_keys_file == "/etc/k2serve/api-keys/keys"
    assert config.chain_store.backend == "redis" and config.chain_store.redis_url_env == "K2SERVE_REDIS_URL"
    assert config.cpu_binding == "none"  # pods get their cores from the kubelet, not from the head pod's plan
    router = children[2]["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["python", "-m", "k2serve.router.process", "--config", "/etc/k2serve/config.yaml"]
    assert {"name": "K2SERVE_CONFIG", "value": "/etc/k2serve/config.yaml"} in router["env"]
    assert router["securityContext"]["readOnlyRootFilesystem"] is True
    assert router["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_network_policy_admits_only_router_and_ray_peers_and_metrics_scrapes() -> None:
    name, namespace, spec = _spec(REPO / "manifests/samples/tiny-k2.yaml")
    policy, router_policy = [c for c in render_children(name, namespace, spec, service_monitor=False)
                             if c["kind"] == "NetworkPolicy"]
    peers, scrapes = policy["spec"]["ingress"]
    sources = [peer["podSelector"]["matchLabels"] for peer in peers["from"]]
    assert sources == [{"ray.io/cluster": "tiny-k2-ray"},
                       {"app.kubernetes.io/instance": "tiny-k2", "app.kubernetes.io/component": "router"}]
    assert scrapes == {"ports": [{"protocol": "TCP", "port": POOL_METRICS_PORT}]}  # from anywhere, that port only
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": "tiny-k2-ray"}
    # Router pods: their HTTP and gRPC ports, nothing else.
    assert router_policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "tiny-k2",
                                                                   "app.kubernetes.io/component": "router"}
    assert router_policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000},
                                                           {"protocol": "TCP", "port": 50051}]}]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_ray_start_resources_parse_as_kuberay_and_bash_do(sample: Path) -> None:
    """KubeRay trims quotes and JSON-parses `resources` (getResourcesMap), then pastes it into a bash line."""
    name, namespace, spec = _spec(sample)
    ray = render_children(name, namespace, spec, service_monitor=False)[1]
    for group in ray["spec"]["workerGroupSpecs"]:
        raw = group["rayStartParams"]["resources"]
        pool = group["groupName"].removesuffix("-workers")
        assert json.loads(raw.strip("'\"` ")) == {f"k2serve_{pool}": 1}
        words = shlex.split(f"ray start --resources={raw}")
        assert json.loads(words[-1].removeprefix("--resources=")) == {f"k2serve_{pool}": 1}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_worker_pods_advertise_room_for_a_rank_and_a_leader(sample: Path) -> None:
    """A group's placement bundles ({CPU: num_cpus_per_actor} each) must fit on pods whose CPUs Ray may also give
    to a group leader (LEADER_CPUS): every worker pod advertises both."""
    name, namespace, spec = _spec(sample)
    ray = render_children(name, namespace, spec, service_monitor=False)[1]
    assert ray["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in ray["spec"]["workerGroupSpecs"]:
        pool = getattr(spec, group["groupName"].removesuffix("-workers"))
        assert int(group["rayStartParams"]["num-cpus"]) >= pool.num_cpus_per_actor + LEADER_CPUS


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_written_path_is_on_a_writable_volume(sample: Path) -> None:
    """Roots are read-only: the model cache and the sqlite chain store are on mounted volumes."""
    name, namespace, spec = _spec(sample)
    children = render_children(name, namespace, spec, service_monitor=False)
    config = ServingConfig.model_validate(yaml.safe_load(children[0]["data"]["config.yaml"]))
    pod_specs = [children[2]["spec"]["template"]["spec"], children[1]["spec"]["headGroupSpec"]["template"]["spec"],
                 *(g["template"]["spec"] for g in children[1]["spec"]["workerGroupSpecs"])]
    for pod in pod_specs:
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
            assert env["K2SERVE_CACHE"] in writable
    router = children[2]["spec"]["template"]["spec"]["containers"][0]
    if config.chain_store.backend == "sqlite":
        assert Path(config.chain_store.sqlite_path).is_absolute()
        assert str(Path(config.chain_store.sqlite_path).parent) in [m["mountPath"] for m in router["volumeMounts"]]


def test_head_pod_shares_its_process_namespace_with_the_pool_controller() -> None:
    """The pool controller's ray.init looks for the raylet among visible processes (ray find_node_ids)."""
    name, namespace, spec = _spec(REPO / "manifests/samples/tiny-k2.yaml")
    ray = render_children(name, namespace, spec, service_monitor=False)[1]
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["shareProcessNamespace"] is True
    assert [c["name"] for c in head["containers"]] == ["ray-head", "pool-controller"]


def _secrets_by_container(children: list[dict[str, Any]]) -> dict[str, set[str]]:
    """container (pod kind/name) -> every Secret it can read (secret volumes it mounts, secretKeyRef env)."""
    ray = next(c for c in children if c["kind"] == "RayCluster")["spec"]
    router = next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    pod_specs = {"router": router, "head": ray["headGroupSpec"]["template"]["spec"],
                 **{g["groupName"]: g["template"]["spec"] for g in ray["workerGroupSpecs"]}}
    out: dict[str, set[str]] = {}
    for pod, spec in pod_specs.items():
        secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec["containers"]:
            mounted = {secret_volumes[m["name"]] for m in c.get("volumeMounts", []) if m["name"] in secret_volumes}
            env = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                   if "secretKeyRef" in e.get("valueFrom", {})}
            out[f"{pod}/{c['name']}"] = mounted | env
    return out


def test_secrets_are_mounted_only_where_used() -> None:
    """API keys and the chain store's redis URL reach the router only, the internal gRPC token every container
    (each serves or calls internal gRPC); no pod gets a service-account token."""
    name, namespace, spec = _spec(REPO / "manifests/samples/kimi-k2-thinking.yaml")
    children = render_children(name, namespace, spec, service_monitor=False)
    secrets = _secrets_by_container(children)
    api_keys, redis = spec.router.api_key_secret, spec.chain_store.redis_url_secret
    assert api_keys is not None and redis is not None
    token = f"{name}-cluster-token"
    assert secrets == {"router/router": {api_keys.name, redis.name, token}, "head/ray-head": {token},
                       "head/pool-controller": {token}, "prefill-workers/ray-worker": {token},
                       "decode-workers/ray-worker": {token}}
    config = ServingConfig.model_validate(yaml.safe_load(children[0]["data"]["config.yaml"]))
    assert config.cluster_token_file == "/var/run/secrets/k2serve/cluster/token"
    ray = next(c for c in children if c["kind"] == "RayCluster")["spec"]
    pod_specs = [next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"],
                 ray["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in ray["workerGroupSpecs"])]
    assert all(p["automountServiceAccountToken"] is False for p in pod_specs)


def test_ray_dashboard_stays_inside_the_head_pod() -> None:
    name, namespace, spec = _spec(REPO / "manifests/samples/tiny-k2.yaml")
    head = render_children(name, namespace, spec, service_monitor=False)[1]["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert [p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]] == ["gcs", "client"]


def test_ray_token_auth_reaches_every_ray_client() -> None:
    """KubeRay puts Ray's token into the Ray containers; the drivers beside them get it from the same Secret."""
    name, namespace, spec = _spec(REPO / "manifests/samples/tiny-k2.yaml")
    children = render_children(name, namespace, spec, service_monitor=False)
    ray = children[1]["spec"]
    assert ray["authOptions"] == {"mode": "token", "secretName": "tiny-k2-cluster-token"}
    drivers = [ray["headGroupSpec"]["template"]["spec"]["containers"][1],
               children[2]["spec"]["template"]["spec"]["containers"][0]]
    for container in drivers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tiny-k2-cluster-token",
                                                                       "key": "auth_token"}}
