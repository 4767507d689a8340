"""How many groups a pool should have: a pure function of the pool's recent load readings (the pool controller,
pools.py, reads them and acts on the answer).

Each reading turns every configured signal into the group count that would bring it to its target, as Kubernetes'
HPA does (`ceil(groups × value / target)`, no change within `tolerance` of the target), and keeps the largest: the
signal that asks for most wins. Stabilisation then looks at a window of readings: the pool grows only to what every
reading of the scale-up window asked for (a burst does not add a group), and shrinks only to what every reading of
the scale-down window allowed (a lull does not drain one). One step at a time — scale-up adds one group, scale-down
drains one — and never outside [min_groups, max_groups].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from k2serve.config import AutoscalingConfig

Direction = Literal["up", "down", "none"]
# The signals, as metric label values (bounded): "range" is a pool outside [min_groups, max_groups].
SIGNALS = ("queue_depth", "running", "kv_use", "ttft", "range")


@dataclass(frozen=True)
class PoolLoad:
    """One reading of a pool's serving groups (draining and starting ones are left out)."""

    groups: int
    waiting: int  # sequences waiting for admission, summed over the groups
    running: int  # sequences running, summed
    kv_used: int  # KV blocks in use, summed
    kv_total: int  # KV blocks in all, summed
    max_running: int  # per group (PoolConfig.max_running)
    ttft_s: float | None = None  # the routers' mean time to first token since the previous reading; None: no data


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic()
    wanted: int  # groups this reading asked for
    signal: str  # the signal that asked for it
    detail: str  # the signal's value against its target, for the reason


@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    signal: str
    reason: str

    @property
    def direction(self) -> Direction:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "none"


def _signals(policy: AutoscalingConfig, load: PoolLoad) -> list[tuple[str, float, float, str]]:
    """(signal, value, target, unit) of every configured signal that has a value in this reading."""
    n = max(load.groups, 1)
    out = []
    if policy.target_queue_depth is not None:
        out.append(("queue_depth", load.waiting / n, policy.target_queue_depth, " waiting/group"))
    if policy.target_running_fraction is not None:
        out.append(("running", load.running / (n * load.max_running), policy.target_running_fraction,
                    " of max_running"))
    if policy.target_kv_use is not None and load.kv_total > 0:
        out.append(("kv_use", load.kv_used / load.kv_total, policy.target_kv_use, " of KV blocks"))
    if policy.ttft_slo_s is not None and load.ttft_s is not None:
        out.append(("ttft", load.ttft_s, policy.ttft_slo_s, " s TTFT"))
    return out


def read(policy: AutoscalingConfig, load: PoolLoad, at: float) -> Reading:
    """What one reading asks for: the most groups any signal wants (`load.groups` when none asks a change)."""
    best: Reading | None = None
    for signal, value, target, unit in _signals(policy, load):
        ratio = value / target
        wanted = load.groups if abs(ratio - 1.0) <= policy.tolerance else math.ceil(max(load.groups, 1) * ratio)
        if best is None or wanted > best.wanted:
            best = Reading(at, wanted, signal, f"{signal} {value:.2f}{unit} vs target {target:g}")
    return best or Reading(at, load.groups, "none", "no signal has a value")


def covered(history: Sequence[Reading], window_s: float, now: float) -> list[Reading] | None:
    """The readings of the last `window_s`, when the history reaches back that far (else None: too early)."""
    if not history or history[0].at > now - window_s:
        return None
    return [r for r in history if r.at >= now - window_s] or [history[-1]]


def decide(policy: AutoscalingConfig, history: Sequence[Reading], current: int, now: float) -> Decision:
    """The pool's next group count from `history` (oldest first; readings since the last change) and the groups it
    has now (`current`, serving and starting)."""
    lo, hi = policy.min_groups, policy.max_groups
    if current < lo:
        return Decision(current, current + 1, "range", f"{current} groups below min_groups {lo}")
    if current > hi:
        return Decision(current, current - 1, "range", f"{current} groups above max_groups {hi}")
    up = covered(history, policy.scale_up_window_s, now)
    if up is not None and current < hi:
        low = min(up, key=lambda r: r.wanted)
        if low.wanted > current:
            peak = max(up, key=lambda r: r.wanted)
            return Decision(current, current + 1, peak.signal,
                            f"{peak.detail}: every reading of {policy.scale_up_window_s:g} s asked for "
                            f"≥ {low.wanted} groups")
    down = covered(history, policy.scale_down_window_s, now)
    if down is not None and current > lo:
        high = max(down, key=lambda r: r.wanted)
        if high.wanted < current:
            return Decision(current, current - 1, high.signal,
                            f"{high.detail}: every reading of {policy.scale_down_window_s:g} s allowed "
                            f"≤ {high.wanted} groups")
    last = history[-1] if history else None
    return Decision(current, current, last.signal if last else "none", last.detail if last else "no readings yet")
