"""One rank of an expert-parallel group, as a Ray actor: the non-expert weights, one expert shard of every MoE
layer, its own `Engine` (attention data-parallel: it owns the sequences assigned to it and their KV cache), and
its place in the group's `torch.distributed` process group."""

from __future__ import annotations

import os
import queue
import socket
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from k2serve.cpu_binding import bind_own
from k2serve.worker.allocator import keep_freed_memory
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.requests import EngineStats, KVHandoff, Request, TokenEvent
from k2serve.worker.engine.grammar import GrammarVocab
from k2serve.k2format.model_config import K2Config
from k2serve.worker.loader import load_weights, resolve_checkpoint
from k2serve.worker.model.dtypes import resolve_dtype
from k2serve.worker.model.ffn import LocalExperts, MoEExecutor
from k2serve.worker.model.k2 import K2Model
from k2serve.worker.parallel.ep import ExpertParallelMoE, expert_range
from k2serve.worker.quant.moe import prepare_experts, select_moe_backend


@dataclass
class RankSnapshot:
    """What a rank reports after every step, so the group answers Stats without another round trip."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_hit_tokens: int
    counters: EngineStats  # a copy of the engine's
    all_to_all_bytes: int  # since the previous snapshot
    expert_load: torch.Tensor | None  # [num_moe_layers, E] tokens routed since the last one sent (see step)


LOAD_REPORT_S = 1.0  # the leader exports expert load to Prometheus once a second
CONCURRENCY_GROUPS = {"admission": 1}  # the actor's groups besides the default one (steps and the rest)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reserved_cpus() -> int:
    """Whole CPUs Ray reserved for this actor (`num_cpus_per_actor`), at least 1 (1 outside an actor)."""
    context = ray.get_runtime_context() if ray.is_initialized() else None
    in_actor = context is not None and context.get_actor_id() is not None
    assigned = context.get_assigned_resources() if in_actor else {}
    return max(1, int(assigned.get("CPU", 1)))


@dataclass
class BuiltEngine:
    engine: Engine
    expert_bytes: int  # resident routed-expert bytes
    executor: ExpertParallelMoE | None  # the MoE's all-to-all side, in a group of more than one


def build_rank_engine(model_dir: str, engine_config: EngineConfig, eos_ids: list[int], deterministic: bool, *,
                 rank: int = 0, world_size: int = 1, lockstep: bool = False) -> BuiltEngine:
    """One rank's engine: the non-expert weights and expert shard `rank` of `world_size` (every expert for a group
    of one), on this process's GPU if it has one. With world_size > 1 the process group must be joined first.
    `lockstep`: one forward every step, in one determinism mode (a rank stepping with peers)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = resolve_dtype(engine_config.dtype, device)
    if not cuda:  # this process steps the model on CPU: its step's tensors come from malloc
        keep_freed_memory()
    rng = expert_range(rank, world_size, K2Config.from_dir(model_dir).n_routed_experts)
    backend = select_moe_backend(device)
    w = load_weights(model_dir, expert_range=rng, dtype=dtype, device=device)
    shards = prepare_experts(w.experts, device, deterministic)
    experts: MoEExecutor = LocalExperts(shards, backend, deterministic)
    executor = None
    if world_size > 1:
        experts = executor = ExpertParallelMoE(shards, backend, rank, world_size, deterministic)
    model = K2Model(w.config, w.dense, experts, deterministic=deterministic)
    config = EngineConfig(**{**engine_config.__dict__, "lockstep": lockstep, "deterministic": deterministic})
    vocab = GrammarVocab.from_model_dir(model_dir, w.config.vocab_size)
    return BuiltEngine(Engine(model, config, eos_token_ids=eos_ids, grammar_vocab=vocab), sum(s.nbytes() for s in shards.values()),
                       executor)


class RankWorker:
    """Constructed cheaply; `setup` loads the shard and joins the process group (it blocks until every rank
    of the group has called it, so the group calls it on all ranks at once).

    `add_request` runs in its own concurrency group (`CONCURRENCY_GROUPS`), beside a step: a new request is
    checked and answered at once instead of after the steps the group queued ahead, and waits in an inbox
    that the engine's own thread empties before each of its calls."""

    def __init__(self, rank: int, world_size: int, cores: list[int] | None = None) -> None:
        if cores and bind_own(cores):  # cores of its own (cpu_binding: auto): every thread there, a torch thread each
            torch.set_num_threads(len(cores))
        else:  # ranks share a node's cores: use only what Ray reserved for us
            torch.set_num_threads(reserved_cpus())
        self.rank = rank
        self.world_size = world_size
        self.engine: Engine | None = None
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # prepared by add_request, not yet enqueued
        self.executor: ExpertParallelMoE | None = None
        self._load_reported = 0.0

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's free port on this node: the address every rank of the group connects to."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, model_source: str, host: str, port: int, engine_config: EngineConfig, eos_ids: list[int],
              deterministic: bool, timeout_s: float) -> int:
        """Joins the group and loads weights + this rank's experts; returns resident routed-expert bytes."""
        if host == "127.0.0.1":  # a single-node loopback cluster; elsewhere Gloo takes the interface the
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # host name resolves to (a pod's own address)
        if self.world_size > 1:  # a group of one holds every expert: no collectives to join
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        # Resolved here, not by the leader: a builtin model the leader built lives only on the leader's pod.
        model_dir = str(resolve_checkpoint(model_source))
        built = build_rank_engine(model_dir, engine_config, eos_ids, deterministic, rank=self.rank,
                                  world_size=self.world_size, lockstep=True)
        self.engine, self.executor = built.engine, built.executor
        return built.expert_bytes

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError(f"rank {self.rank} is not set up")
        return self.engine

    def _stepping(self) -> Engine:
        """The engine, for the calls that run on its thread (the default concurrency group), with every request
        added so far enqueued: they see the requests in the order the leader added them."""
        eng = self._engine()
        while not self._inbox.empty():
            eng.enqueue(self._inbox.get_nowait())
        return eng

    def max_model_len(self) -> int:
        return self._engine().max_model_len

    @ray.method(concurrency_group="admission")
    def add_request(self, request_id: str, prompt: list[int], params: Any, kwargs: dict[str, Any],
                    kv: KVHandoff | None = None) -> int:
        """`kv`: a handed-off KV. The leader passes its object-store ref as this top-level argument, so Ray
        resolves it here: the KV goes from where the prefill rank left it to this rank, never through a leader.
        A bad request raises here; a good one is in the engine before the next call on the engine's thread."""
        seq = self._engine().prepare(request_id, prompt, params, kv=kv, **kwargs)
        self._inbox.put(seq)
        return seq.seed

    def cancel(self, request_id: str) -> bool:
        return self._stepping().cancel(request_id)

    def export_kv(self, request_id: str) -> KVHandoff:
        """The KV, left as a task return the group owns in the object store for the decode group's rank."""
        return self._stepping().export_kv(request_id)

    def release(self, request_id: str) -> bool:
        return self._stepping().release(request_id)

    def step(self) -> tuple[list[TokenEvent], RankSnapshot]:
        """One lockstep step (an empty forward when this rank has nothing to run). The expert-load counts
        (K2: 61 × 384 numbers) ride along at most every LOAD_REPORT_S, and whenever the rank runs dry, so
        nothing is left uncounted."""
        eng = self._stepping()
        events = eng.step()
        now = time.monotonic()
        report = not eng.has_work() or now - self._load_reported >= LOAD_REPORT_S
        if report:
            self._load_reported = now
        snap = RankSnapshot(len(eng.running), len(eng.waiting), eng.blocks.num_used_blocks,
                            eng.blocks.num_free_blocks, eng.blocks.prefix_hit_tokens, replace(eng.stats),
                            self.executor.counter.take() if self.executor else 0,
                            eng.model.expert_load.take() if report else None)
        return events, snap
