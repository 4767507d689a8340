"""The group leader, a Ray actor: builds its group — an `ExpertParallelGroup` of rank actors, or for a group of one
whose leader has no cores apart from its rank's (`engine_in_leader`) an `InLeaderGroup` whose engine runs in this
process (in_leader_group.py) —, drives it with an `EngineLoop` and serves the `WorkerGroup` gRPC service over it. When the
group fails (a rank died, a collective timed out, a step raised) every in-flight stream ends with an error naming
the lost requests, Health reports unhealthy, and the leader rebuilds the group (fresh ranks, placement group and
rendezvous; a fresh engine) and serves again on the same address. A leader started in place of a dead one counts
a restart too.

It also executes configured faults (`ServingConfig.faults`): `kill_actor` SIGKILLs one rank's process (this one,
where the engine runs here), `kill_group` every rank's and then its own — by PID, so the same faults work in a
real cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from k2serve.cluster_auth import cluster_token
from k2serve.config import GROUP_REGISTRY_ACTOR, RAY_NAMESPACE, FaultSpec, PoolConfig, ServingConfig
from k2serve.cpu_binding import GroupCores, bind_process
from k2serve.metrics import Metrics
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.requests import TokenEvent
from k2serve.worker.engine.loop import EngineLoop
from k2serve.worker.loader import resolve_checkpoint
from k2serve.worker.parallel.ep_group import ExpertParallelGroup, RankFailure, GroupSpec
from k2serve.worker.parallel.in_leader_group import InLeaderGroup, engine_in_leader
from k2serve.groups import Role
from k2serve.worker.grpc_service import WorkerService
from k2serve.worker.kv_handoff import RegistryPeers
from k2serve.k2format.model_config import K2Config
from k2serve.k2format.tokenizer import K2Tokenizer

log = logging.getLogger(__name__)

Pool = Literal["prefill", "decode"]
SUPERVISE_INTERVAL_S = 0.05
EXPERT_LOAD_EXPORT_S = 1.0
REBUILD_BACKOFF_S = 1.0
DECODE_STEPS_AHEAD = 2  # see GroupSpec.steps_ahead


@dataclass
class Failure:
    at: float  # time.time() when the leader saw it
    detail: str
    request_ids: list[str]
    recovered_at: float | None = None


@dataclass
class _ArmedFault:
    spec: FaultSpec
    fired: int = 0
    tokens: int = 0  # produced since it last fired


def group_spec(config: ServingConfig, pool: PoolConfig, *, collective_timeout_s: float = 30.0,
               steps_ahead: int = 0) -> GroupSpec:
    model_dir = resolve_checkpoint(config.model.source)
    return GroupSpec(model_source=config.model.source, world_size=pool.expert_parallel,
                     engine=EngineConfig.for_pool(pool, config),
                     eos_ids=K2Tokenizer.from_dir(model_dir).eos_ids, deterministic=config.deterministic,
                     placement=pool.placement, num_cpus_per_actor=pool.num_cpus_per_actor,
                     num_gpus_per_actor=pool.num_gpus_per_actor, resources=dict(pool.ray_resources),
                     collective_timeout_s=collective_timeout_s, steps_ahead=steps_ahead)


class GroupLeader:
    """Use as a Ray actor (`ray.remote(GroupLeader)`); `start()` must be awaited before anything else."""

    def __init__(self, config: ServingConfig, pool: Pool, index: int, role: Role, *,
                 collective_timeout_s: float = 30.0, cores: GroupCores | None = None, replaces: bool = False,
                 namespace: str = RAY_NAMESPACE) -> None:
        """`replaces`: this leader takes the place of one that died (the pool controller's replacement);
        `namespace`: the Ray namespace of the pool's registry and leaders (where KV handoff peers are found)."""
        self.namespace = namespace
        self.config = config
        self.pool = pool
        self.role: Role = role
        self.group_id = f"{role}-{index}"
        self.spec = group_spec(config, getattr(config, pool), collective_timeout_s=collective_timeout_s,
                               steps_ahead=0 if role == "prefill" else DECODE_STEPS_AHEAD)
        self.spec.rank_cores = cores.ranks if cores is not None else None
        self._local = engine_in_leader(self.spec.world_size, cores)
        if cores is not None:  # off the ranks' cores (k2serve/cpu_binding.py)
            bind_process(cores.front)
        self.faults = [_ArmedFault(f) for f in config.faults
                       if f.pool == pool and f.group == index and f.kind in ("kill_actor", "kill_group")]
        self.metrics = Metrics()
        self.failures: list[Failure] = []
        self.address = ""
        self.metrics_port = 0
        self._group: ExpertParallelGroup | InLeaderGroup | None = None
        self._replaces = replaces
        self._service: WorkerService | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._last_load_export = 0.0

    async def start(self) -> dict[str, Any]:
        import ray

        if self._service is not None:
            return self.info()
        host = ray.util.get_node_ip_address()
        kind = InLeaderGroup if self._local else ExpertParallelGroup
        self._group = await asyncio.to_thread(kind, self.spec)
        peers = RegistryPeers(self.namespace, GROUP_REGISTRY_ACTOR)
        self._service = WorkerService(self._loop(self._group), group_id=self.group_id, role=self.role,
                                      block_size=self.spec.engine.block_size, metrics=self.metrics, peers=peers,
                                      token=cluster_token(self.config.cluster_token_file), tls=self.config.tls)
        self.address = await self._service.start(host, 0)
        self.metrics.init_experts(self._group.moe_layers, K2Config.from_dir(resolve_checkpoint(self.spec.model_source)).n_routed_experts)
        self.metrics_port = self.metrics.serve(0, host)
        self.metrics.group_healthy.labels(role=self.role, group=self.group_id).set(1)
        if self._replaces:
            self.metrics.group_restarts.labels(role=self.role).inc()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self.info()

    def info(self) -> dict[str, Any]:
        """What the registry publishes for routers (plus what operators and tests look at)."""
        return {"group_id": self.group_id, "role": self.role, "pool": self.pool, "address": self.address,
                "metrics_port": self.metrics_port, "world_size": self.spec.world_size,
                "healthy": self._service is not None and self._service.failed is None,
                "leader_pid": os.getpid(), "rank_pids": self.rank_pids(), "restarts": len(self.failures),
                "node_ids": self.node_ids()}

    def node_ids(self) -> list[str]:
        """The Ray nodes (in a cluster: the pods) this group runs on, its leader's included."""
        import ray

        ranks = self._group.node_ids if isinstance(self._group, ExpertParallelGroup) else []
        return sorted({ray.get_runtime_context().get_node_id(), *ranks})

    async def load(self) -> dict[str, int]:
        """What the pool controller's autoscaler reads: running and waiting sequences, KV blocks used and in all
        (all 0 while the group is rebuilding: a failed group carries no load)."""
        service = self._service
        if service is None or service.failed is not None or service.loop.error is not None:
            return {"running": 0, "waiting": 0, "kv_used": 0, "kv_total": 0}
        s = await service.load()
        return {"running": s.running, "waiting": s.waiting, "kv_used": s.kv_blocks_used,
                "kv_total": s.kv_blocks_used + s.kv_blocks_free}

    def drain(self, on: bool) -> None:
        """With `on`: takes no new requests from now on (Health answers unhealthy), running ones finish; without:
        takes requests again."""
        if self._service is not None:
            self._service.draining = on

    def metrics_text(self) -> str:
        """This leader's metrics in the Prometheus text format (the pool controller serves them merged)."""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry).decode()

    def rank_pids(self) -> list[int]:
        return list(self._group.pids) if self._group is not None else []

    def expert_bytes(self) -> list[int]:
        return list(self._group.expert_bytes) if self._group is not None else []

    def held_kv_ref(self, hid: bytes) -> list[Any] | None:
        """[ObjectRef] of the KV this group holds under handle id `hid` (in a list, so Ray hands over the ref,
        not the object), or None. Asked by decode leaders over Ray (worker/kv_handoff.py RegistryPeers)."""
        ref = self._service.held.get(hid) if self._service is not None else None
        return [ref] if ref is not None else None

    def failure_log(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.failures]

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        if self._service is not None:
            await self._service.stop()
            self._service = None
        if self._group is not None:
            await asyncio.to_thread(self._group.shutdown)
            self._group = None

    # ---- supervision ----------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            service, group = self._service, self._group
            if service is None or group is None:
                continue
            # A dead rank may be found by a call outside the engine loop (admitting a request, a KV export) while
            # the loop idles: the group is failed then although the loop has no error, and must be rebuilt too.
            dead_rank = group.failed if isinstance(group, ExpertParallelGroup) else None
            err = service.loop.error or dead_rank
            if err is None:
                continue
            lost = err.request_ids if isinstance(err, RankFailure) else group.request_ids()
            failure = Failure(time.time(), str(err), lost)
            self.failures.append(failure)
            service.failed = str(err)
            log.warning("group %s failed, rebuilding: %s", self.group_id, err)
            await self._rebuild(group)
            old, service.loop = service.loop, self._loop(group)
            service.loop.start()
            await old.stop()
            service.failed = None
            failure.recovered_at = time.time()
            self.metrics.group_restarts.labels(role=self.role).inc()


    def _loop(self, group: ExpertParallelGroup | InLeaderGroup) -> EngineLoop:
        if isinstance(group, InLeaderGroup):
            return EngineLoop(group.engine, self._on_step, thread_init=group.bind_thread)
        return EngineLoop(group, self._on_step)

    async def _rebuild(self, group: ExpertParallelGroup | InLeaderGroup) -> None:
        while True:
            try:
                await asyncio.to_thread(group.rebuild)
                return
            except Exception:  # e.g. no room for the placement group yet: keep trying, stay unhealthy
                log.exception("group %s: rebuild failed, retrying", self.group_id)
                await asyncio.sleep(REBUILD_BACKOFF_S)

    def _on_step(self, events: list[TokenEvent]) -> None:
        """Runs between steps (no step is being launched, collected or finished), so reading the group's step
        results is safe."""
        group = self._group
        if group is None:
            return
        labels = {"role": self.role, "group": self.group_id}
        self.metrics.all_to_all_bytes.labels(**labels).inc(group.all_to_all_bytes)
        group.all_to_all_bytes = 0
        now = time.monotonic()
        if now - self._last_load_export >= EXPERT_LOAD_EXPORT_S:
            self._last_load_export = now
            self._export_expert_load(group)
        for fault in self.faults:
            fault.tokens += len(events)
            if fault.fired < fault.spec.times and fault.tokens >= fault.spec.after_tokens:
                fault.fired += 1
                fault.tokens = 0
                self._fire(fault.spec, group)

    def _export_expert_load(self, group: ExpertParallelGroup | InLeaderGroup) -> None:
        load = group.take_expert_load()  # [num_moe_layers, E]
        if load is None:
            return
        for layer, row in zip(group.moe_layers, load.tolist()):
            for expert, n in enumerate(row):
                if n:
                    self.metrics.expert_tokens.labels(layer=str(layer), expert=str(expert)).inc(n)

    def _fire(self, fault: FaultSpec, group: ExpertParallelGroup | InLeaderGroup) -> None:
        log.warning("group %s: injecting fault %s", self.group_id, fault)
        if fault.kind == "kill_actor":
            if fault.rank >= len(group.pids):
                raise ValueError(f"fault {fault}: group {self.group_id} has only {len(group.pids)} ranks")
            os.kill(group.pids[fault.rank], signal.SIGKILL)
            return
        for pid in group.pids:
            os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
