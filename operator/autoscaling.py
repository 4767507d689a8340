"""Autoscaled pools on Kubernetes. The pool controller in the Ray head pod decides (the same code as under
`k2serve up`: worker/parallel/pool_scaler.py) and reports its pools' sizes and last decisions as JSON on its metrics
port; the operator reads that report each reconcile, sizes the RayCluster's worker groups to it (groups serving,
starting or draining, times expert parallelism), shows desired/ready groups and the last decision in the status,
and posts an Event per decision. Without a report (the head pod not up yet) a pool gets its starting count."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable

from pydantic import ValidationError

from k2serve.config import POOL_METRICS_PORT
from k2serve.operator import pods
from k2serve.operator.spec import K2DeploymentSpec, K2DeploymentStatus, PoolStatus, ScaleDecisionStatus
from k2serve.scaling import SCALING_PATH, ScaleDecision, ScalingReport

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
MAX_REPORT_BYTES = 64 << 10

# (K2Deployment name, namespace) → the pool controller's report, or None when it does not answer.
ScalingSource = Callable[[str, str], ScalingReport | None]


# Where the pool controller's report is, `{ray}` the RayCluster's name: through the Ray head's Service (KubeRay
# names it `<cluster>-head-svc`). An operator outside the cluster is given another (`k2serve operator --scaling-url`).
SCALING_URL = f"http://{{ray}}-head-svc.{{namespace}}.svc:{POOL_METRICS_PORT}{SCALING_PATH}"


def http_scaling(url_template: str = SCALING_URL) -> ScalingSource:
    def fetch(name: str, namespace: str) -> ScalingReport | None:
        url = url_template.format(ray=pods.ray_name(name), namespace=namespace)
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                return ScalingReport.model_validate_json(response.read(MAX_REPORT_BYTES + 1)[:MAX_REPORT_BYTES])
        except (OSError, ValidationError) as e:
            log.info("no autoscaling report from %s yet: %s", url, e)
            return None
    return fetch


def autoscaled(spec: K2DeploymentSpec) -> bool:
    return any(getattr(spec, pool).autoscaling is not None for pool in pods.POOLS)


def pool_groups(spec: K2DeploymentSpec, report: ScalingReport | None) -> dict[str, int]:
    """Groups each pool needs worker pods for now: fixed pools their `groups`; autoscaled ones what the pool
    controller runs (serving + starting + draining: a draining group's pods go only once it is removed), within
    [minGroups, maxGroups]."""
    out = {}
    for pool in pods.POOLS:
        cfg = getattr(spec, pool)
        state = report.pools.get(pool) if report is not None else None
        if cfg.autoscaling is None:
            out[pool] = cfg.groups
        elif state is None:
            out[pool] = cfg.initial_groups()
        else:
            out[pool] = min(max(state.desired + state.draining, cfg.autoscaling.min_groups),
                            cfg.autoscaling.max_groups)
    return out


def surplus_pods(spec: K2DeploymentSpec, report: ScalingReport | None) -> dict[str, list[str]]:
    """The worker pods KubeRay is to remove first (`scaleStrategy.workersToDelete`) per autoscaled pool: those the
    pool controller reports idle beyond what its groups need, so that shrinking never takes a pod a group runs on."""
    out: dict[str, list[str]] = {}
    for pool in pods.POOLS:
        state = report.pools.get(pool) if report is not None else None
        if getattr(spec, pool).autoscaling is not None:
            out[pool] = list(state.surplus_pods) if state is not None else []
    return out


def decision_status(decision: ScaleDecision | None) -> ScaleDecisionStatus | None:
    if decision is None:
        return None
    return ScaleDecisionStatus(at=decision.at, from_groups=decision.from_groups, to_groups=decision.to_groups,
                               signal=decision.signal, reason=decision.reason)


def with_decisions(status: K2DeploymentStatus, previous: K2DeploymentStatus, report: ScalingReport | None
                   ) -> tuple[K2DeploymentStatus, list[str]]:
    """`status` with each autoscaled pool's last decision (kept from `previous` when no report came), and an
    Event message for each decision not shown before."""
    events, update = [], {}
    for pool in pods.POOLS:
        before: PoolStatus = getattr(previous, pool)
        state = report.pools.get(pool) if report is not None else None
        last = decision_status(state.last) if state is not None else before.last_scale_decision
        if last is not None and last != before.last_scale_decision:
            events.append(f"{pool}: {last.from_groups} -> {last.to_groups} groups ({last.signal}): {last.reason}")
        update[pool] = getattr(status, pool).model_copy(update={"last_scale_decision": last})
    return status.model_copy(update=update), events
