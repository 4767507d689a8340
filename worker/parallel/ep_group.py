"""An expert-parallel worker group: N `RankWorker` actors in one placement group, joined in one
`torch.distributed` group, driven as one stepping engine (`add_request/cancel/has_work/step/release`) so an
`EngineLoop` and the worker gRPC service run over it as over a single-process `Engine`. A KV handoff never
passes through the leader: `export_kv_ref` leaves the prefill rank's KV in Ray's object store, and
`add_request` hands a decode rank its ref (`kv_in_object_store`).

Attention is data-parallel: each request lives on one rank (the one whose prefix cache holds its prompt's
prefix, else the least loaded when it arrives). Every `step` steps all ranks at once — they meet in the MoE
all-to-alls of every layer; a rank without work joins with an empty batch. A rank's death (Ray reports it
within about a second) or a collective timeout (a hung rank: its peers' collectives time out) fails the group
with the ids of every request it held; `rebuild` replaces all ranks on a fresh placement group and rendezvous
port.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2serve.config import Placement
from k2serve.k2format.block_hash import block_hashes
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.requests import EngineStats, KVHandoffLost, TokenEvent
from k2serve.k2format.model_config import K2Config
from k2serve.worker.loader import resolve_checkpoint
from k2serve.worker.parallel.ep import expert_range
from k2serve.worker.parallel.rank import CONCURRENCY_GROUPS, RankSnapshot, RankWorker



@dataclass
class GroupSpec:
    # The model as configured (`builtin:tiny-k2`, a directory): every process resolves it where it runs, because
    # what one pod resolved (the builtin model's cache folder) need not exist on the pod of another rank.
    model_source: str
    world_size: int
    engine: EngineConfig
    eos_ids: list[int]
    deterministic: bool = False
    placement: Placement = "PACK"
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    collective_timeout_s: float = 30.0  # longest a rank waits for its peers inside one collective
    start_timeout_s: float = 120.0  # placement, weight loading and rendezvous
    # Steps queued on the ranks beyond the one being collected, so a rank keeps stepping while the leader
    # streams tokens (one ahead still left a decode rank idle ~20% of the time on CPU, two ~12%). A KV export
    # waits behind the queued steps, so prefill groups, whose exports are on the TTFT path, queue none.
    steps_ahead: int = 0
    rank_cores: list[list[int]] | None = None  # [world_size] cores each rank binds to (k2serve/cpu_binding.py)


# Within a group, a request goes to the rank that holds its prompt's longest known prefix (keys: `block_hashes`
# at 16 KV blocks a key), unless that rank runs more than AFFINITY_SLACK more requests than the least loaded one.
AFFINITY_STRIDE_BLOCKS = 16
AFFINITY_SLACK = 4
AFFINITY_KEYS = 1 << 16


class RankFailure(RuntimeError):
    """The group lost a rank or a collective timed out; `request_ids` are the sequences it held."""

    def __init__(self, detail: str, request_ids: list[str]) -> None:
        super().__init__(f"worker group failed ({detail}); lost requests: {', '.join(request_ids) or 'none'}")
        self.detail = detail
        self.request_ids = request_ids


@dataclass
class GroupBlocks:
    """KV blocks of all ranks together (the `Engine.blocks` fields the worker service reads)."""

    num_used_blocks: int = 0
    num_free_blocks: int = 0
    prefix_hit_tokens: int = 0


class ExpertParallelGroup:
    kv_in_object_store = True  # the worker service hands KV over as ObjectRefs (export_kv_ref, add_request kv=)

    def __init__(self, spec: GroupSpec) -> None:
        model = K2Config.from_dir(resolve_checkpoint(spec.model_source))
        expert_range(0, spec.world_size, model.n_routed_experts)  # N must divide E: fail before any actor starts
        self.moe_layers: list[int] = list(model.moe_layers)  # rows of `expert_load`
        self.spec = spec
        self.ranks: list[Any] = []  # RankWorker actor handles
        self.pids: list[int] = []
        self.node_ids: list[str] = []  # Ray nodes hosting the ranks
        self.expert_bytes: list[int] = []  # resident routed-expert bytes per rank
        self.max_model_len = 0
        self.owner: dict[str, int] = {}  # request id -> rank, for every request added and not yet dropped
        self.active: set[str] = set()  # requests still generating
        # hold_kv requests -> the tokens their KV will cover (prompt + output_prefix: a finished one-token request
        # has computed exactly those), kept by their rank after they finish
        self.holding: dict[str, int] = {}
        self.blocks = GroupBlocks()
        self.stats = EngineStats()  # every rank's engine counters, summed
        self.all_to_all_bytes = 0  # since the leader last exported it
        self.expert_load: torch.Tensor | None = None  # [num_moe_layers, E] since the last take
        self.failed: RankFailure | None = None
        self._snaps: list[RankSnapshot] = []
        self._base = EngineStats()  # counted by ranks that a rebuild replaced
        self._pg: PlacementGroup | None = None
        self._ahead: deque[list[Any]] = deque()  # steps already submitted to every rank, oldest first
        # Prompt prefix (`block_hashes` key) -> the rank that last took a request starting with it: its prefix cache
        # holds that prefix, so the chain's next turn goes there instead of re-prefilling on another rank.
        self._affinity: OrderedDict[bytes, int] = OrderedDict()
        self.build()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Places N fresh ranks and joins them in a new process group on a fresh port."""
        s = self.spec
        bundle = {"CPU": s.num_cpus_per_actor, **({"GPU": s.num_gpus_per_actor} if s.num_gpus_per_actor else {}),
                  **s.resources}
        self._pg = placement_group([dict(bundle) for _ in range(s.world_size)], strategy=s.placement)
        if not self._pg.wait(s.start_timeout_s):
            raise RuntimeError(f"placement group of {s.world_size} × {bundle} not placed in {s.start_timeout_s} s")
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RankWorker)
        self.ranks = [
            actor.options(num_cpus=s.num_cpus_per_actor, num_gpus=s.num_gpus_per_actor, resources=s.resources,
                          max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self._pg, placement_group_bundle_index=r)).remote(
                                  r, s.world_size, s.rank_cores[r] if s.rank_cores else None)
            for r in range(s.world_size)
        ]
        host, port = ray.get(self.ranks[0].rendezvous_address.remote(), timeout=s.start_timeout_s)
        self.pids = ray.get([r.pid.remote() for r in self.ranks], timeout=s.start_timeout_s)
        # Where the ranks run (their pods, in a cluster): scale-down must not remove these.
        self.node_ids = sorted(set(ray.util.placement_group_table(self._pg)["bundles_to_node_id"].values()))
        self.expert_bytes = ray.get(
            [r.setup.remote(s.model_source, host, port, s.engine, s.eos_ids, s.deterministic, s.collective_timeout_s)
             for r in self.ranks], timeout=s.start_timeout_s)
        self.max_model_len = ray.get(self.ranks[0].max_model_len.remote(), timeout=s.start_timeout_s)
        self.owner.clear()
        self.active.clear()
        self.holding.clear()
        self._affinity.clear()  # fresh ranks, empty caches
        self._base = self.stats
        self._snaps = []
        self._ahead.clear()
        self.failed = None

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.ranks = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def rebuild(self) -> None:
        self.shutdown()
        self.build()

    # ---- the stepping-engine surface ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> int:
        self._check()
        ids = [request_id, *(rid for rid, _ in kwargs.get("forks", ()))]  # its other choices run on its rank
        if taken := [rid for rid in ids if rid in self.owner]:
            raise ValueError(f"request {taken[0]!r} is already in this group")
        load = [0] * len(self.ranks)
        for rid in self.active:
            load[self.owner[rid]] += 1
        rank = min(range(len(self.ranks)), key=lambda r: (load[r], r))
        keys = block_hashes(prompt, self.spec.engine.block_size * AFFINITY_STRIDE_BLOCKS)
        cached = next((self._affinity[k] for k in reversed(keys) if k in self._affinity), None)
        if cached is not None and load[cached] <= load[rank] + AFFINITY_SLACK:
            rank = cached
        kv = kwargs.pop("kv", None)  # a KVHandoff or its ObjectRef: a top-level argument, which Ray resolves
        try:
            seed = self._get(self.ranks[rank].add_request.remote(request_id, prompt, params, kwargs,
                                                                 *(() if kv is None else (kv,))))
        except ray.exceptions.RayTaskError as e:
            # The rank refused the request (ValueError: a bad request), or Ray could not hand it the KV argument:
            # the export that made it failed (RayTaskError of its KeyError, or of the prefill rank's death). The
            # second is the prefill side's loss, not this group's: re-prefill instead.
            if kv is None or isinstance(e.cause, ValueError):
                raise
            raise KVHandoffLost(f"request {request_id!r}: handed-off KV not produced: {e.cause!r}") from e
        except ray.exceptions.ObjectLostError as e:  # the ref's object is gone or its owner died
            raise KVHandoffLost(f"request {request_id!r}: handed-off KV unreadable: {type(e).__name__}") from e
        for k in keys:
            self._affinity[k] = rank
            self._affinity.move_to_end(k)
        while len(self._affinity) > AFFINITY_KEYS:
            self._affinity.popitem(last=False)
        for rid in ids:
            self.owner[rid] = rank
            self.active.add(rid)
        if kwargs.get("hold_kv"):
            self.holding[request_id] = len(prompt) + len(kwargs.get("output_prefix") or ())
        return seed

    def cancel(self, request_id: str) -> bool:
        rank = self._drop(request_id)
        if rank is None or self.failed is not None:
            return False
        return bool(self._get(self.ranks[rank].cancel.remote(request_id)))

    def has_work(self) -> bool:
        return bool(self.active) and self.failed is None

    def export_kv_ref(self, request_id: str) -> tuple[Any, int]:
        """(ObjectRef of the KVHandoff, its token count) of a finished `hold_kv` request: the KV stays in the
        object store as the rank's task return (owned by this process), never loaded here. Nothing waits for the
        rank: the count is in this group's books, and an export that fails shows where the KV is read (the
        decode side re-prefills), so a prefill answers without another round trip to its rank."""
        self._check()
        tokens = self.holding.get(request_id)
        rank = self._drop(request_id)
        if rank is None or tokens is None:
            raise KeyError(f"no held KV for request {request_id!r}")
        return self.ranks[rank].export_kv.remote(request_id), tokens

    def release(self, request_id: str) -> bool:
        rank = self._drop(request_id)
        if rank is None or self.failed is not None:
            return False
        return bool(self._get(self.ranks[rank].release.remote(request_id)))

    def request_ids(self) -> list[str]:
        """Every request the group holds (generating, or finished and holding KV)."""
        return sorted(self.owner)

    @property
    def running(self) -> list[None]:
        """One entry per running sequence (the service only counts them)."""
        return [None] * sum(s.running for s in self._snaps)

    @property
    def waiting(self) -> list[None]:
        return [None] * sum(s.waiting for s in self._snaps)

    def step(self) -> list[TokenEvent]:
        """One step of every rank: `launch_step`, `collect_step` and `finish_step` in a row."""
        refs = self.launch_step()
        return self.finish_step(self.collect_step(refs))

    def launch_step(self) -> list[Any]:
        """The ranks' next step (already queued ahead, or submitted now): one ref per rank."""
        self._check()
        return self._ahead.popleft() if self._ahead else [r.step.remote() for r in self.ranks]

    def collect_step(self, refs: list[Any]) -> list[tuple[list[TokenEvent], RankSnapshot]]:
        """Waits for the ranks' results. It touches no request state, so an `EngineLoop` runs it off the
        engine's thread: adds, cancels and KV exports go on meanwhile instead of waiting out the step."""
        return self._gather(refs)

    def finish_step(self, results: list[tuple[list[TokenEvent], RankSnapshot]]) -> list[TokenEvent]:
        """The step's events, with the group's books updated. While requests remain, up to `spec.steps_ahead`
        following steps are submitted first: a rank runs its calls in order, so it keeps stepping while the
        leader streams these tokens instead of idling for a round trip (calls made meanwhile run after them, except
        `add_request`, which a rank answers beside its steps)."""
        events = [ev for evs, _ in results for ev in evs]
        for ev in events:
            if ev.finish_reason is not None:
                self.active.discard(ev.request_id)
                if ev.request_id not in self.holding:
                    self.owner.pop(ev.request_id, None)
        self._absorb([snap for _, snap in results])
        while self.active and len(self._ahead) < self.spec.steps_ahead:
            self._ahead.append([r.step.remote() for r in self.ranks])
        return events

    def take_expert_load(self) -> torch.Tensor | None:
        """[num_moe_layers, E] tokens routed to each expert, all ranks together, since the last take."""
        out, self.expert_load = self.expert_load, None
        return out

    # ---- internals ------------------------------------------------------------------------------------
    def _drop(self, request_id: str) -> int | None:
        self.active.discard(request_id)
        self.holding.pop(request_id, None)
        return self.owner.pop(request_id, None)

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed

    def _fail(self, detail: str) -> RankFailure:
        self.failed = RankFailure(detail, sorted(self.owner))
        return self.failed

    def _get(self, ref: Any) -> Any:
        """One rank call; a dead rank fails the group. The call's own error (RayTaskError) is the caller's: it
        is also a RayActorError when an argument came from a rank that died — another group's, not this one."""
        try:
            return ray.get(ref, timeout=self.spec.collective_timeout_s)
        except ray.exceptions.RayTaskError:
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise self._fail(f"rank call failed: {type(e).__name__}") from e

    def _gather(self, refs: list[Any]) -> list[tuple[list[TokenEvent], RankSnapshot]]:
        """Waits for every rank's step, failing as soon as any one fails (its peers may hang in a collective
        until their timeout: don't wait for them)."""
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        # A hung peer shows as a collective timeout on the others; this bound only catches a rank that
        # hangs outside any collective.
        deadline = time.monotonic() + 2 * self.spec.collective_timeout_s + 60.0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._fail(f"ranks {sorted(rank_of[p] for p in pending)} did not finish a step")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                raise self._fail(f"rank {rank_of[ready[0]]} died") from e
            except ray.exceptions.RayTaskError as e:  # a collective timed out or broke on that rank
                raise self._fail(f"rank {rank_of[ready[0]]} step failed: {e.cause!r}") from e
        return ray.get(refs)

    def _absorb(self, snaps: list[RankSnapshot]) -> None:
        self._snaps = snaps
        self.blocks = GroupBlocks(sum(s.kv_blocks_used for s in snaps), sum(s.kv_blocks_free for s in snaps),
                                  sum(s.prefix_hit_tokens for s in snaps))
        self.stats = sum((s.counters for s in snaps), self._base)
        self.all_to_all_bytes += sum(s.all_to_all_bytes for s in snaps)
        loads = [s.expert_load for s in snaps if s.expert_load is not None]
        if loads:
            load = torch.stack(loads).sum(0)  # [num_moe_layers, E]
            self.expert_load = load if self.expert_load is None else self.expert_load + load
