"""The pool controller's autoscaler for one pool: every `interval_s` it takes a reading of the pool's load (its
serving groups' running/waiting sequences and KV blocks, and the routers' TTFT), asks `autoscale.decide` for the
group count, and when that changes records the decision — counted in metrics, logged, kept for the operator — for
the controller to act on (pools.py: scale-up launches a group, scale-down drains one)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from k2serve.config import AutoscalingConfig
from k2serve.metrics import Metrics
from k2serve.scaling import PoolScaling, ScaleDecision
from k2serve.worker.parallel.autoscale import Decision, PoolLoad, Reading, decide, read

log = logging.getLogger(__name__)

TTFT_METRIC = "k2serve_time_to_first_token_seconds"


class RouterTtft:
    """Mean time to first token since the previous call, from the routers' metrics exposition (`fetch()` → text);
    None when no first token was timed meanwhile or the routers do not answer."""

    def __init__(self, fetch: Callable[[], str]) -> None:
        self.fetch = fetch
        self._sum = 0.0
        self._count = 0.0

    def __call__(self) -> float | None:
        try:
            text = self.fetch()
        except OSError as e:
            log.warning("router metrics unavailable for the TTFT signal: %s", e)
            return None
        total = count = 0.0
        for family in text_string_to_metric_families(text):
            if family.name == TTFT_METRIC:
                for sample in family.samples:
                    if sample.name == TTFT_METRIC + "_sum":
                        total += sample.value
                    elif sample.name == TTFT_METRIC + "_count":
                        count += sample.value
        if count < self._count:  # a router restarted: its counters began again
            self._sum = self._count = 0.0
        d_sum, d_count = total - self._sum, count - self._count
        self._sum, self._count = total, count
        return d_sum / d_count if d_count > 0 else None


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PoolScaler:
    def __init__(self, pool: str, policy: AutoscalingConfig, max_running: int, metrics: Metrics,
                 ttft: Callable[[], float | None] | None = None) -> None:
        self.pool, self.policy, self.max_running, self.metrics = pool, policy, max_running, metrics
        self.ttft = ttft
        self.history: list[Reading] = []  # since the last decision, oldest first
        self.decisions = 0
        self.last: ScaleDecision | None = None
        self._next_at = 0.0
        for direction in ("up", "down"):
            metrics.autoscale_decisions.labels(pool=pool, direction=direction)

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def step(self, loads: list[dict[str, int]], groups: int, now: float) -> Decision | None:
        """One reading (`loads`: the serving groups' `GroupLeader.load()`; `groups`: serving + starting) and the
        decision it leads to, or None when the count stays."""
        self._next_at = now + self.policy.interval_s
        load = PoolLoad(groups=len(loads), waiting=sum(x["waiting"] for x in loads),
                        running=sum(x["running"] for x in loads), kv_used=sum(x["kv_used"] for x in loads),
                        kv_total=sum(x["kv_total"] for x in loads), max_running=self.max_running,
                        ttft_s=self.ttft() if self.ttft is not None else None)
        self.history.append(read(self.policy, load, now))
        # Only what the longer window needs, plus the reading that shows the window is covered.
        horizon = now - max(self.policy.scale_up_window_s, self.policy.scale_down_window_s)
        while len(self.history) > 1 and self.history[1].at <= horizon:
            self.history.pop(0)
        decision = decide(self.policy, self.history, groups, now)
        if decision.direction == "none":
            return None
        self.history.clear()  # the next change needs a whole window of readings of the new pool
        self.decisions += 1
        self.last = ScaleDecision(pool=self.pool, at=_now_rfc3339(), seq=self.decisions,
                                  from_groups=decision.current, to_groups=decision.desired, signal=decision.signal,
                                  reason=decision.reason)
        self.metrics.autoscale_decisions.labels(pool=self.pool, direction=decision.direction).inc()
        log.info("autoscale %s: %d -> %d groups (%s)", self.pool, decision.current, decision.desired, decision.reason)
        return decision

    def report(self, desired: int, ready: int, draining: int, surplus_pods: list[str]) -> PoolScaling:
        """The pool's state now, into the gauges and for the operator."""
        self.metrics.pool_desired_groups.labels(pool=self.pool).set(desired)
        self.metrics.pool_ready_groups.labels(pool=self.pool).set(ready)
        self.metrics.pool_draining_groups.labels(pool=self.pool).set(draining)
        return PoolScaling(desired=desired, ready=ready, draining=draining, surplus_pods=surplus_pods,
                           last=self.last)
