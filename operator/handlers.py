"""Thin kopf registrations around one idempotent reconcile: validate spec → render children → create or
merge-patch what differs → observe children → write status. Create, update, resume and a timer all run the
same function, so the operator is level-based; delete removes the children explicitly (owner references
make the API server's garbage collector do it too)."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import kopf
from pydantic import ValidationError

from k2serve.metrics import Metrics
from k2serve.operator import kube as k
from k2serve.operator import pods
from k2serve.operator.autoscaling import ScalingSource, autoscaled, pool_groups, surplus_pods, with_decisions
from k2serve.operator.capacity_gate import check_capacity
from k2serve.operator.image_policy import CONDITION as IMAGE_CONDITION
from k2serve.operator.image_policy import check_images
from k2serve.operator.download_job import (ModelVerdict, hub_source, job_name, model_verdict, progress_name,
                                           render_download)
from k2serve.operator.render import render_children, render_cluster_token
from k2serve.operator.spec import GROUP, PLURAL, VERSION, K2DeploymentSpec, K2DeploymentStatus
from k2serve.operator.status import Observed, Wanted, blocked_status, compute_status, invalid_status, with_conditions

FINALIZER = "k2serve.io/operator"


def spec_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field as it is spelled in the CR."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        lines.append(f"spec.{path}: {err['msg']}" if path else err["msg"].removeprefix("Value error, "))
    return "; ".join(lines)


def covers(actual: Any, desired: Any) -> bool:
    """Whether `actual` already holds every value of `desired` (so a merge-patch would change nothing)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(covers(actual.get(key), value) for key, value in desired.items())
    return actual == desired


def _converge(kube: k.Kube, child: dict[str, Any]) -> str | None:
    """Creates or patches one child; returns what was done, or None when it already matched."""
    ref = k.ref_of(child)
    meta = child["metadata"]
    existing = kube.get(ref, meta["namespace"], meta["name"])
    if existing is None:
        if _create(kube, child):
            return f"created {child['kind']} {meta['name']}"
        # AlreadyExists: a concurrent reconcile of the same CR (kopf runs the timer beside change handlers).
        existing = kube.get(ref, meta["namespace"], meta["name"]) or {}
    wanted = {key: value for key, value in child.items() if key not in ("apiVersion", "kind", "status")}
    if covers(existing, wanted):
        return None
    kube.patch(ref, meta["namespace"], meta["name"], wanted)
    return f"updated {child['kind']} {meta['name']}"


def _create(kube: k.Kube, obj: dict[str, Any]) -> bool:
    """Creates `obj`; False when it already exists (HTTP 409), which a racing reconcile may have done."""
    try:
        kube.create(obj)
    except k.KubeError as e:
        if e.status != 409:
            raise
        return False
    return True


def _observe(kube: k.Kube, name: str, namespace: str, kuberay: bool) -> Observed:
    raycluster = kube.get(k.RAYCLUSTER, namespace, pods.ray_name(name)) if kuberay else None
    worker_pods = kube.list(k.POD, namespace, {"ray.io/cluster": pods.ray_name(name), "ray.io/node-type": "worker"})
    router = kube.get(k.DEPLOYMENT, namespace, pods.router_name(name))
    return Observed(kuberay_installed=kuberay, raycluster=raycluster, worker_pods=worker_pods, router=router)


def reconcile(kube: k.Kube, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger | Any,
              allowed_images: tuple[str, ...] = (), scaling: ScalingSource | None = None) -> K2DeploymentStatus:
    """`allowed_images`: prefixes every pod image must start with (none: any image); `scaling`: where autoscaled
    pools' sizes come from (the pool controller's report; operator/autoscaling.py)."""
    name, namespace = body.metadata.name, body.metadata.namespace
    generation = int(body.metadata.get("generation") or 0)
    previous = K2DeploymentStatus.model_validate(
        {key: value for key, value in dict(body.status).items() if key in _STATUS_KEYS}
    )
    try:
        spec = K2DeploymentSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        message = spec_error(exc)
        status = invalid_status(message, generation, previous)
        if previous.phase != "Invalid" or previous.observed_generation != generation:
            kopf.warn(body, reason="InvalidSpec", message=message)
        logger.warning("invalid spec: %s", message)
        patch.status.update(status.model_dump(by_alias=True, mode="json"))
        return status

    images = check_images(spec, allowed_images)
    if images.allowed is False:  # refused before any child (so any pod) exists
        status = blocked_status(images.reason, images.message, generation, previous,
                                [(IMAGE_CONDITION, False, images.reason, images.message)])
        if _reason(previous, IMAGE_CONDITION) != images.reason or previous.observed_generation != generation:
            kopf.warn(body, reason=images.reason, message=images.message)
        logger.warning("image not allowed: %s", images.message)
        patch.status.update(status.model_dump(by_alias=True, mode="json"))
        return status

    capacity = check_capacity(spec)
    schedulable: Wanted = ("Schedulable", capacity.fits, capacity.reason, capacity.message)
    if capacity.fits is False:  # refused before any child (so any pod) exists
        status = blocked_status(capacity.reason, capacity.message, generation, previous, [schedulable])
        if _reason(previous, "Schedulable") != capacity.reason or previous.observed_generation != generation:
            kopf.warn(body, reason="Unschedulable", message=capacity.message)
        logger.warning("unschedulable: %s", capacity.message)
        patch.status.update(status.model_dump(by_alias=True, mode="json"))
        return status

    kuberay = kube.served(k.RAYCLUSTER)
    model = _observe_model(kube, name, namespace, spec)
    report = scaling(name, namespace) if scaling is not None and autoscaled(spec) else None
    groups = pool_groups(spec, report)
    gateway_api = kube.served(k.INFERENCEPOOL) and kube.served(k.HTTPROUTE)
    children = [*render_download(name, namespace, spec),
                *render_children(name, namespace, spec, service_monitor=kube.served(k.SERVICEMONITOR), groups=groups,
                                 remove=surplus_pods(spec, report), gateway_api=gateway_api)]
    if not kuberay or not model.ready:  # worker groups start only once the model is in place
        children = [c for c in children if c["kind"] != "RayCluster"]
    if not model.ready and kube.get(k.CONFIGMAP, namespace, pods.config_name(name)):
        # A new revision downloading: running workers keep reading the folder they were started on.
        children = [c for c in children if c["metadata"]["name"] != pods.config_name(name)]
    kopf.adopt(children, owner=body)
    if kube.get(k.SECRET, namespace, pods.cluster_token_name(name)) is None:
        token = render_cluster_token(name, namespace, secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        kopf.adopt(token, owner=body)
        if _create(kube, token):
            kopf.info(body, reason="Reconciled", message=f"created Secret {token['metadata']['name']}")
    for child in children:
        if done := _converge(kube, child):
            kopf.info(body, reason="Reconciled", message=done)
    if spec.router.gateway is not None and not gateway_api and previous.observed_generation != generation:
        kopf.warn(body, reason="GatewayAPIMissing", message="spec.router.gateway is set but the cluster does not "
                  "serve InferencePool (inference.networking.k8s.io/v1) and HTTPRoute (gateway.networking.k8s.io/v1)")
    if spec.router.gateway is None and gateway_api:  # exposure turned off: its children go
        for gone in _delete_gateway(kube, name, namespace):
            kopf.info(body, reason="Reconciled", message=f"deleted {gone}")
    if not kuberay and _reason(previous, "Degraded") != "KubeRayMissing":
        kopf.warn(body, reason="KubeRayMissing", message="RayCluster CRD (ray.io/v1) not installed; install KubeRay")

    status = compute_status(name, namespace, spec, generation, _observe(kube, name, namespace, kuberay), previous,
                            groups)
    status, decisions = with_decisions(status, previous, report)
    for message in decisions:
        kopf.info(body, reason="Scaled", message=message)
    checks: list[Wanted] = [("ModelReady", model.ready, model.reason, model.message), schedulable]
    if images.allowed is not None:
        checks.append((IMAGE_CONDITION, True, images.reason, images.message))
    status = with_conditions(status, previous, checks, generation, model=model.status)
    if model.ready and _reason(previous, "ModelReady") == "Downloading":
        kopf.info(body, reason="ModelReady", message=model.message)
    if status.phase != previous.phase:
        kopf.info(body, reason=status.phase, message=f"phase {previous.phase} -> {status.phase}")
    patch.status.update(status.model_dump(by_alias=True, mode="json"))
    return status


_STATUS_KEYS = {f.alias or n for n, f in K2DeploymentStatus.model_fields.items()}


def _observe_model(kube: k.Kube, name: str, namespace: str, spec: K2DeploymentSpec) -> ModelVerdict:
    if hub_source(spec) is None:
        return model_verdict(spec, None, None)
    job = kube.get(k.JOB, namespace, job_name(name, spec.model.source))
    return model_verdict(spec, job, kube.get(k.CONFIGMAP, namespace, progress_name(name)))


def _reason(status: K2DeploymentStatus, condition: str) -> str | None:
    return next((c.reason for c in status.conditions if c.type == condition), None)


def delete_children(kube: k.Kube, body: kopf.Body) -> list[str]:
    """Deletes every child this operator may have made (whatever the spec says now); absent ones are fine."""
    name, namespace = body.metadata.name, body.metadata.namespace
    gone = []
    if kube.delete(k.SECRET, namespace, pods.cluster_token_name(name)):
        gone.append(f"Secret {pods.cluster_token_name(name)}")
    try:  # the download's children are named after the source: only the spec knows them
        download = render_download(name, namespace, K2DeploymentSpec.model_validate(dict(body.spec)))
    except ValidationError:
        download = []
    for child in [*render_children(name, namespace, K2DeploymentSpec(), service_monitor=True), *download]:
        ref = k.ref_of(child)
        if (ref != k.RAYCLUSTER or kube.served(ref)) and (ref != k.SERVICEMONITOR or kube.served(ref)):
            if kube.delete(ref, namespace, child["metadata"]["name"]):
                gone.append(f"{child['kind']} {child['metadata']['name']}")
    if kube.served(k.INFERENCEPOOL) and kube.served(k.HTTPROUTE):
        gone += _delete_gateway(kube, name, namespace)
    return gone


def _delete_gateway(kube: k.Kube, name: str, namespace: str) -> list[str]:
    """Deletes the Gateway API children that exist (the caller checked their API is served)."""
    gone = []
    for ref in (k.HTTPROUTE, k.INFERENCEPOOL):
        if kube.get(ref, namespace, pods.router_name(name)) is not None and kube.delete(ref, namespace,
                                                                                        pods.router_name(name)):
            gone.append(f"{ref.kind} {pods.router_name(name)}")
    return gone


def observed_reconcile(memo: kopf.Memo, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger | Any) -> None:
    """`reconcile`, counted and timed in the operator's metrics (the memo carries them: see `run.operate`)."""
    metrics: Metrics = memo.metrics
    memo.managed.add(body.metadata.uid)
    metrics.managed_deployments.set(len(memo.managed))
    start = time.perf_counter()
    outcome = "error"
    try:
        status = reconcile(memo.kube, body, patch, logger, memo.get("allowed_images", ()), memo.get("scaling"))
        outcome = "invalid" if status.phase == "Invalid" else "ok"
    finally:
        metrics.reconciles.labels(outcome=outcome).inc()
        metrics.reconcile_seconds.observe(time.perf_counter() - start)


def build_registry(resync_seconds: float = 30.0, *, scan: bool = True) -> kopf.OperatorRegistry:
    """A fresh registry (not kopf's global one), so tests and `k2serve operator` build theirs independently.
    `scan=False` (a fixed list of namespaces): kopf neither lists nor watches namespaces and CRDs cluster-wide,
    so a namespace-scoped operator needs no cluster-wide read rights."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.INFO
        settings.scanning.disabled = not scan

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    def converge(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        observed_reconcile(memo, body, patch, logger)

    @kopf.timer(*resource, interval=resync_seconds, initial_delay=resync_seconds, registry=registry)
    def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        observed_reconcile(memo, body, patch, logger)

    @kopf.on.delete(*resource, registry=registry)
    def remove(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.managed.discard(body.metadata.uid)
        memo.metrics.managed_deployments.set(len(memo.managed))
        gone = delete_children(memo.kube, body)
        kopf.info(body, reason="Deleted", message="deleted " + (", ".join(gone) or "nothing"))

    return registry
