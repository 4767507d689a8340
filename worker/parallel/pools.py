"""The pool controller (`k2serve pools`, a Ray driver; in-process under `k2serve up`): keeps
`prefill.groups` + `decode.groups` group leaders (aggregated mode: `prefill.groups` leaders serving both roles)
alive as named, detached actors, replaces one that died, and publishes every group's gRPC address, role and id
in the `k2serve-registry` actor, where routers read them (`registry_groups`).

Leaders are named `k2serve-<role>-<i>` in the controller's namespace, so a restarted controller adopts the
groups that are still alive instead of starting twins. `k2serve pools` (pools_cli.py) runs it as a process and
serves every group's metrics, merged, on one fixed port (`pool_metrics.py`): what Prometheus scrapes in a cluster.

A pool with `autoscaling` is sized by its `PoolScaler` (pool_scaler.py, deciding with autoscale.py): scale-up
launches one more group (published once it serves); scale-down drains the newest group — it answers Health
unhealthy, so routers send it nothing new, while its running turns finish — and removes it once it has been idle
for `DRAIN_QUIET_S`, or after the policy's `drain_timeout_s`, when turns still running on it move to another group
through chain resume, as after any group failure. The decisions and pool sizes are exported as metrics, logged,
and served as JSON on the metrics port (`SCALING_PATH`) for the operator, which sizes the worker pods to them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from k2serve.config import GROUP_REGISTRY_ACTOR as REGISTRY_NAME
from k2serve.config import RAY_NAMESPACE as NAMESPACE
from k2serve.config import LEADER_CPUS, FaultSpec, ServingConfig
from k2serve.cpu_binding import CorePlan, allowed_cores, plan_cores
from k2serve.metrics import Metrics
from k2serve.scaling import ScalingReport
from k2serve.worker.kv_handoff import leader_actor_name
from k2serve.worker.parallel.leader import GroupLeader, Pool
from k2serve.worker.parallel.in_leader_group import engine_in_leader
from k2serve.worker.parallel.pool_scaler import PoolScaler, RouterTtft
from k2serve.groups import Role

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 5.0
NAME_RELEASE_TIMEOUT_S = 30.0  # a dead actor's name is freed asynchronously
# A draining group idle this long is removed: well past the time routers take to see it unhealthy (they poll every
# 0.5 s), so no request they picked before can still be on its way to it.
DRAIN_QUIET_S = 2.0


class GroupRegistry:
    """Ray actor holding what routers need to reach the groups."""

    def __init__(self) -> None:
        self._groups: list[dict[str, Any]] = []

    def set(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups

    def groups(self) -> list[dict[str, Any]]:
        return self._groups


def registry_groups(namespace: str = NAMESPACE, role: Role | None = None) -> list[dict[str, Any]]:
    """The published groups (`group_id`, `role`, `address`, `healthy`, ...), from any Ray driver or actor."""
    registry = ray.get_actor(REGISTRY_NAME, namespace=namespace)
    groups: list[dict[str, Any]] = ray.get(registry.groups.remote(), timeout=CALL_TIMEOUT_S)
    return [g for g in groups if role is None or g["role"] == role]


class _Slot:
    def __init__(self, pool: Pool, index: int, role: Role) -> None:
        self.pool, self.index, self.role = pool, index, role
        self.group_id = f"{role}-{index}"
        self.leader: Any = None  # actor handle
        self.info: dict[str, Any] | None = None
        self.starting: Any = None  # ref of a scale-up's start(), until it answers
        self.draining_since: float | None = None  # time.monotonic() scale-down drained it
        self.idle_since: float | None = None  # since when a draining group has had nothing running or waiting


class PoolController:
    def __init__(self, config: ServingConfig, *, namespace: str = NAMESPACE, check_interval_s: float = 1.0,
                 collective_timeout_s: float = 30.0, router_metrics: Callable[[], str] | None = None) -> None:
        """`router_metrics`: the routers' metrics exposition, for pools that scale on TTFT."""
        self.config = config
        self.namespace = namespace
        self.check_interval_s = check_interval_s
        self.collective_timeout_s = collective_timeout_s
        self.replacements = 0
        pools: list[tuple[Pool, Role]] = ([("prefill", "both")] if config.router.aggregated
                                          else [("prefill", "prefill"), ("decode", "decode")])
        self._roles = dict(pools)
        self._slots = [_Slot(pool, i, role) for pool, role in pools
                       for i in range(getattr(config, pool).initial_groups())]
        self.metrics = Metrics()  # the controller's own: autoscaling
        self._scalers: dict[Pool, PoolScaler] = {}
        for pool, _ in pools:
            cfg = getattr(config, pool)
            if cfg.autoscaling is not None:
                ttft = RouterTtft(router_metrics) if router_metrics is not None else None
                self._scalers[pool] = PoolScaler(pool, cfg.autoscaling, cfg.max_running, self.metrics, ttft)
        self._scaling = ScalingReport()
        # kill_group faults (and kill_actor where the engine runs in the leader) kill the leader that fired them:
        # count firings here so a replacement doesn't fire them again.
        self._faults_left = [f.times for f in config.faults]
        self._registry: Any = None
        self.cores: CorePlan | None = None  # made by start() (k2serve/cpu_binding.py)
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- public API -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts (or adopts) every group, publishes them, and keeps them alive from a background thread."""
        if not ray.is_initialized():
            raise RuntimeError("PoolController.start needs a Ray connection (ray.init first)")
        self._registry = ray.remote(GroupRegistry).options(
            name=REGISTRY_NAME, namespace=self.namespace, lifetime="detached", num_cpus=0,
            get_if_exists=True).remote()
        self.cores = self._plan_cores()
        pending = {slot.group_id: self._adopt_or_launch(slot) for slot in self._slots}
        for slot in self._slots:
            slot.info = ray.get(pending[slot.group_id], timeout=START_TIMEOUT_S)
        self._publish()
        self._monitor = threading.Thread(target=self._watch, name="k2serve-pool-controller", daemon=True)
        self._monitor.start()

    def groups(self, role: Role | None = None) -> list[dict[str, Any]]:
        """The live groups this controller manages (`role`: only that role)."""
        with self._lock:
            return [dict(s.info) for s in self._slots if s.info is not None and role in (None, s.role)]

    def scaling(self) -> ScalingReport:
        """The autoscaled pools' sizes and last decisions (what `SCALING_PATH` serves)."""
        with self._lock:
            return self._scaling.model_copy(deep=True)

    def read_registry(self) -> list[dict[str, Any]]:
        return registry_groups(self.namespace)

    def metrics_texts(self) -> dict[str, str]:
        """Every live leader's metrics exposition by group id (`pool_metrics` serves them merged); a leader
        that does not answer in time is left out."""
        with self._lock:
            leaders = {s.group_id: s.leader for s in self._slots if s.info is not None and s.leader is not None}
        refs = {gid: leader.metrics_text.remote() for gid, leader in leaders.items()}
        out: dict[str, str] = {}
        for gid, ref in refs.items():
            try:
                out[gid] = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("group %s: no metrics this scrape", gid)
        return out

    def stop(self) -> None:
        """Stops watching, then stops and kills every leader (their ranks go with them) and the registry."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()
            self._monitor = None
        for slot in self._slots:
            if slot.leader is None:
                continue
            try:
                ray.get(slot.leader.stop.remote(), timeout=CALL_TIMEOUT_S * 6)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # already dead or stuck: killed below either way
            ray.kill(slot.leader)
            slot.leader, slot.info = None, None
        if self._registry is not None:
            ray.kill(self._registry)
            self._registry = None

    # ---- internals ------------------------------------------------------------------------------------
    def _plan_cores(self) -> CorePlan | None:
        """Cores of their own for the ranks, when the whole cluster is this one node and has a core to spare."""
        # An autoscaled pool's groups come and go: no fixed plan of cores for them.
        if self.config.cpu_binding != "auto" or self._scalers or len([n for n in ray.nodes() if n["Alive"]]) != 1:
            return None
        pools = {p: getattr(self.config, p) for p in ("prefill", "decode")}
        return plan_cores([(s.group_id, pools[s.pool].expert_parallel, pools[s.pool].num_cpus_per_actor)
                           for s in self._slots], allowed_cores())

    def _adopt_or_launch(self, slot: _Slot) -> Any:
        """A ref to the slot's leader info: the running leader's, or a freshly started one's."""
        try:
            slot.leader = ray.get_actor(self._name(slot), namespace=self.namespace)
            return slot.leader.start.remote()  # start() is idempotent: a running leader answers its info
        except ValueError:
            return self._launch(slot)

    def _name(self, slot: _Slot) -> str:
        return leader_actor_name(slot.group_id)

    def _launch(self, slot: _Slot, replaces: bool = False) -> Any:
        config = self.config.model_copy(update={"faults": self._faults_for(slot)})
        pool = getattr(self.config, slot.pool)
        # A leader that runs its group's engine (in_leader_group.py) reserves what the rank would.
        resources: dict[str, Any] = ({"num_cpus": pool.num_cpus_per_actor, "num_gpus": pool.num_gpus_per_actor,
                                      "resources": dict(pool.ray_resources)}
                                     if self._in_leader(slot) else {"num_cpus": LEADER_CPUS})
        deadline = time.monotonic() + NAME_RELEASE_TIMEOUT_S
        while True:
            try:
                slot.leader = ray.remote(GroupLeader).options(
                    name=self._name(slot), namespace=self.namespace, lifetime="detached", max_restarts=0,
                    **resources).remote(config, slot.pool, slot.index, slot.role,
                                        collective_timeout_s=self.collective_timeout_s,
                                        cores=self.cores.groups[slot.group_id] if self.cores else None,
                                        replaces=replaces, namespace=self.namespace)
                return slot.leader.start.remote()
            except ValueError:  # the dead leader's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _in_leader(self, slot: _Slot) -> bool:
        cores = self.cores.groups[slot.group_id] if self.cores else None
        return engine_in_leader(getattr(self.config, slot.pool).expert_parallel, cores)

    def _faults_for(self, slot: _Slot) -> list[FaultSpec]:
        return [f.model_copy(update={"times": left}) for f, left in zip(self.config.faults, self._faults_left)
                if left > 0 and f.pool == slot.pool and f.group == slot.index]

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            for slot in list(self._slots):
                if self._stop.is_set():
                    return
                if slot.starting is not None:
                    self._check_start(slot)
                    continue
                try:
                    info = ray.get(slot.leader.info.remote(), timeout=CALL_TIMEOUT_S)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    if slot.draining_since is not None:  # scaled away anyway: its running turns migrate
                        log.warning("draining group %s lost (%s): removing it", slot.group_id, type(e).__name__)
                        self._remove(slot)
                        continue
                    log.warning("group %s lost (%s): replacing it", slot.group_id, type(e).__name__)
                    info = self._replace(slot)
                    if info is None:
                        continue
                if info != slot.info:
                    with self._lock:
                        slot.info = info
                    self._publish()  # routers learn a new address or health now, not after the other slots
            if self._scalers and not self._stop.is_set():
                self._autoscale(time.monotonic())

    # ---- autoscaling ----------------------------------------------------------------------------------
    def _autoscale(self, now: float) -> None:
        for pool, scaler in self._scalers.items():
            slots = [s for s in self._slots if s.pool == pool]
            draining = [s for s in slots if s.draining_since is not None]
            for slot in draining:
                self._check_drain(slot, scaler.policy.drain_timeout_s, now)
            serving = [s for s in self._slots if s.pool == pool and s.draining_since is None
                       and s.starting is None and s.info is not None]
            # No readings while a group starts: the pool's size is in flux, and its load is what one group fewer
            # carries (the next decision needs a whole window of readings of the grown pool).
            if scaler.due(now) and not any(s.starting is not None for s in slots):
                decision = scaler.step(self._loads(serving), len(slots) - len(draining), now)
                if decision is not None and decision.direction == "up":
                    self._scale_up(pool)
                elif decision is not None and serving:
                    self._drain(max(serving, key=lambda s: s.index), now)
            slots = [s for s in self._slots if s.pool == pool]
            n_draining = sum(s.draining_since is not None for s in slots)
            ready = sum(s.draining_since is None and s.starting is None and s.info is not None for s in slots)
            state = scaler.report(desired=len(slots) - n_draining, ready=ready, draining=n_draining,
                                  surplus_pods=self._surplus_pods(pool, len(slots)))
            with self._lock:
                self._scaling.pools[pool] = state

    def _surplus_pods(self, pool: Pool, groups: int) -> list[str]:
        """Hostnames (KubeRay: pod names) of the pool's Ray nodes — those with all of its `ray_resources` — beyond
        `groups` × EP that host no group or leader: what the operator may remove when the pool shrinks."""
        cfg = getattr(self.config, pool)
        if not cfg.ray_resources:  # no nodes of its own (k2serve up): nothing to remove
            return []
        nodes = [n for n in ray.nodes() if n["Alive"] and all(r in n["Resources"] for r in cfg.ray_resources)]
        with self._lock:
            busy = {node for s in self._slots for node in (s.info or {}).get("node_ids", [])}
        idle = sorted(n["NodeManagerHostname"] for n in nodes if n["NodeID"] not in busy)
        return idle[:max(0, len(nodes) - groups * cfg.expert_parallel)]

    def _loads(self, slots: list[_Slot]) -> list[dict[str, int]]:
        """The serving groups' loads; a group that does not answer in time is left out of this reading."""
        refs = [s.leader.load.remote() for s in slots]
        out = []
        for slot, ref in zip(slots, refs):
            try:
                out.append(ray.get(ref, timeout=CALL_TIMEOUT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("group %s: no load reading", slot.group_id)
        return out

    def _scale_up(self, pool: Pool) -> None:
        """Takes back a draining group of the pool (the newest), else launches one more."""
        draining = [s for s in self._slots if s.pool == pool and s.draining_since is not None]
        if draining:
            slot = max(draining, key=lambda s: s.index)
            try:
                ray.get(slot.leader.drain.remote(False), timeout=CALL_TIMEOUT_S)
                slot.draining_since = slot.idle_since = None
                log.info("group %s takes requests again (scale-up while it drained)", slot.group_id)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self._remove(slot)
        used = {s.index for s in self._slots if s.pool == pool}
        slot = _Slot(pool, min(set(range(len(used) + 1)) - used), self._roles[pool])
        slot.starting = self._launch(slot)
        with self._lock:
            self._slots.append(slot)
        log.info("group %s starting (scale-up)", slot.group_id)

    def _check_start(self, slot: _Slot) -> None:
        ready, _ = ray.wait([slot.starting], timeout=0)
        if not ready:
            return
        try:
            info = ray.get(slot.starting, timeout=CALL_TIMEOUT_S)
        except Exception:  # no room, a start error: kill it and launch again on the next round
            log.exception("starting group %s failed, retrying", slot.group_id)
            ray.kill(slot.leader)
            slot.starting = self._launch(slot)
            return
        slot.starting = None
        with self._lock:
            slot.info = info
        self._publish()
        log.info("group %s serves on %s (scale-up)", slot.group_id, info["address"])

    def _drain(self, slot: _Slot, now: float) -> None:
        try:
            ray.get(slot.leader.drain.remote(True), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            log.warning("group %s lost while draining: removing it", slot.group_id)
            self._remove(slot)
            return
        slot.draining_since, slot.idle_since = now, None
        log.info("group %s draining (scale-down): no new requests, running turns finish", slot.group_id)

    def _check_drain(self, slot: _Slot, timeout_s: float, now: float) -> None:
        try:
            load = ray.get(slot.leader.load.remote(), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            load = {"running": 0, "waiting": 0}  # dead: nothing left to finish there
        assert slot.draining_since is not None
        if load["running"] or load["waiting"]:
            slot.idle_since = None
        elif slot.idle_since is None:
            slot.idle_since = now
        if slot.idle_since is not None and now - slot.idle_since >= DRAIN_QUIET_S:
            log.info("group %s drained: removed", slot.group_id)
            self._remove(slot)
        elif now - slot.draining_since >= timeout_s:
            log.warning("group %s still runs %d turns after the drain timeout (%g s): removed, they resume on "
                        "another group", slot.group_id, load["running"] + load["waiting"], timeout_s)
            self._remove(slot)

    def _remove(self, slot: _Slot) -> None:
        with self._lock:
            self._slots.remove(slot)
        self._publish()  # routers drop it now
        try:
            ray.get(slot.leader.stop.remote(), timeout=CALL_TIMEOUT_S * 6)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # already dead or stuck: killed below either way
        ray.kill(slot.leader)

    def _replace(self, slot: _Slot) -> dict[str, Any] | None:
        with self._lock:
            slot.info = None
        self._publish()  # routers stop seeing the dead address at once
        ray.kill(slot.leader)
        # The faults that kill a leader: kill_group, and kill_actor where the engine runs in the leader.
        local = self._in_leader(slot)
        for i, f in enumerate(self.config.faults):
            kills_leader = f.kind == "kill_group" or (f.kind == "kill_actor" and local)
            if kills_leader and f.pool == slot.pool and f.group == slot.index and self._faults_left[i]:
                self._faults_left[i] -= 1
        try:
            info: dict[str, Any] = ray.get(self._launch(slot, replaces=True), timeout=START_TIMEOUT_S)
        except Exception:  # no room yet, a start error: try again on the next round
            log.exception("replacing group %s failed", slot.group_id)
            return None
        self.replacements += 1
        return info

    def _publish(self) -> None:
        ray.get(self._registry.set.remote(self.groups()), timeout=CALL_TIMEOUT_S)
