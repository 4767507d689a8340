"""Children as observed → the K2Deployment status (phase, conditions, per-pool readiness, endpoint). Pure."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2serve.operator import pods
from k2serve.operator.raycluster import worker_group_name
from k2serve.operator.spec import Condition, K2DeploymentSpec, K2DeploymentStatus, PoolStatus


@dataclass(frozen=True)
class Observed:
    kuberay_installed: bool
    raycluster: dict[str, Any] | None
    worker_pods: list[dict[str, Any]] = field(default_factory=list)
    router: dict[str, Any] | None = None


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _pool_status(pool: str, groups: int, ep: int, worker_pods: list[dict[str, Any]]) -> PoolStatus:
    group_label = worker_group_name(pool)
    ready_pods = sum(1 for p in worker_pods
                     if p.get("metadata", {}).get("labels", {}).get("ray.io/group") == group_label and _pod_ready(p))
    # A group serves only with all of its EP shards; the pool controller packs shards into whole groups.
    ready = min(groups, ready_pods // ep)
    return PoolStatus(ready=ready, desired=groups, readiness=f"{ready}/{groups}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# (type, holds, reason, message); holds None: Unknown.
Wanted = tuple[str, bool | None, str, str]


def _conditions(previous: list[Condition], wanted: list[Wanted], generation: int) -> list[Condition]:
    """Keeps lastTransitionTime when a condition's status did not change."""
    before = {c.type: c for c in previous}
    out = []
    for type_, ok, reason, message in wanted:
        status = "Unknown" if ok is None else "True" if ok else "False"
        old = before.get(type_)
        since = old.last_transition_time if old and old.status == status else _now()
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             last_transition_time=since, observed_generation=generation))
    return out


def _stopped(phase: str, reason: str, message: str, next_step: str, generation: int,
             previous: K2DeploymentStatus) -> K2DeploymentStatus:
    conditions = _conditions(previous.conditions, [
        ("Ready", False, reason, message),
        ("Progressing", False, reason, next_step),
        ("Degraded", True, reason, message),
    ], generation)
    return previous.model_copy(update={"phase": phase, "conditions": conditions, "observed_generation": generation})


def invalid_status(message: str, generation: int, previous: K2DeploymentStatus) -> K2DeploymentStatus:
    return _stopped("Invalid", "InvalidSpec", message, "fix the spec to continue", generation, previous)


def with_conditions(status: K2DeploymentStatus, previous: K2DeploymentStatus, extra: list[Wanted],
                    generation: int, **fields: object) -> K2DeploymentStatus:
    """`status` plus conditions computed elsewhere (ModelReady, Schedulable) and other status fields."""
    added = _conditions(previous.conditions, extra, generation)
    kept = [c for c in status.conditions if c.type not in {c.type for c in added}]
    return status.model_copy(update={"conditions": kept + added, **fields})


def blocked_status(reason: str, message: str, generation: int, previous: K2DeploymentStatus,
                   extra: list[Wanted]) -> K2DeploymentStatus:
    """A valid spec that cannot run as written (e.g. does not fit its GPUs): nothing is created."""
    status = _stopped("Degraded", reason, message, "change the spec to continue", generation, previous)
    return with_conditions(status, previous, extra, generation)


def compute_status(name: str, namespace: str, spec: K2DeploymentSpec, generation: int, observed: Observed,
                   previous: K2DeploymentStatus, groups: Mapping[str, int] | None = None) -> K2DeploymentStatus:
    """`groups`: each pool's desired group count (autoscaling.pool_groups); default: the spec's `groups`."""
    want = groups or {"prefill": spec.prefill.groups, "decode": spec.decode.groups}
    prefill = _pool_status("prefill", want["prefill"], spec.prefill.expert_parallel, observed.worker_pods)
    decode = _pool_status("decode", want["decode"], spec.decode.expert_parallel, observed.worker_pods)
    router = observed.router or {}
    router_ready = int(router.get("status", {}).get("readyReplicas") or 0)
    ray_state = (observed.raycluster or {}).get("status", {}).get("state", "")
    endpoint = f"http://{pods.router_name(name)}.{namespace}.svc:{spec.router.http_port}"

    if not observed.kuberay_installed:
        degraded = (True, "KubeRayMissing", "the RayCluster CRD (ray.io/v1) is not installed: install KubeRay")
    elif ray_state == "failed":
        degraded = (True, "RayClusterFailed", f"RayCluster {pods.ray_name(name)} reports state 'failed'")
    else:
        degraded = (False, "AsExpected", "")
    pools_ready = prefill.ready == prefill.desired and decode.ready == decode.desired
    ready = not degraded[0] and pools_ready and router_ready >= 1 and ray_state == "ready"
    if ready:
        readiness = (True, "AllGroupsReady", f"{router_ready} router(s), all worker groups ready")
    else:
        waiting = [what for what, ok in (("RayCluster", ray_state == "ready"), ("prefill groups", prefill.ready ==
                   prefill.desired), ("decode groups", decode.ready == decode.desired), ("router", router_ready >= 1))
                   if not ok]
        readiness = (False, "Waiting", "waiting for " + ", ".join(waiting))
    progressing = (not ready and not degraded[0], "Reconciling" if not ready else "Converged",
                   readiness[2] if not ready else "")
    conditions = _conditions(previous.conditions, [("Ready", *readiness), ("Progressing", *progressing),
                                                   ("Degraded", *degraded)], generation)
    phase = "Ready" if ready else "Degraded" if degraded[0] else "Progressing"
    decode_selector = f"ray.io/cluster={pods.ray_name(name)},ray.io/group={worker_group_name('decode')}"
    return K2DeploymentStatus(phase=phase, conditions=conditions, prefill=prefill, decode=decode,
                              endpoint=endpoint if router_ready else None, observed_generation=generation,
                              selector=decode_selector)
