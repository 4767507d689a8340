"""A worker group of one (`expert_parallel: 1`) whose engine runs inside the group leader's process, stepped on the
engine loop's thread, instead of in a rank actor that the leader steps over Ray — unless the node's CPU plan
gives the leaders cores of their own (`engine_in_leader`).

Why: one rank has no all-to-all to join, and a step over Ray costs a task submission, a pickled reply and wakeups
on both sides every step. Where the ranks take every core (P/D on 2 cores: the leaders could only run on the ranks'
cores), that relay is pure cost: P/D gained ~20% tokens/s with the engines in their leaders. Where the leaders have
cores of their own (aggregated on 2 cores: the rank on one, the rest on the other), a leader process relaying in
parallel with its engine wins instead (~10%): in one process the relay and the engine's Python share one GIL
(bench/RESULTS.md). Without a plan (a cluster, `cpu_binding: none`) the engine runs in the leader, as vLLM runs a
single-device engine in-process and uses Ray only across devices.

The leader then reserves the rank's resources (CPUs, GPU, custom resources) for itself (pools.py). Under a plan the
engine's thread, which runs every model step, binds itself to the rank's cores while the leader's other threads
stay on the front cores. A step that raises fails the group: the leader's supervisor rebuilds it in place (a fresh
engine over the loaded weights). A `kill_actor` fault on rank 0 kills the process holding rank 0 — here the leader
— and the pool controller replaces the group.
"""

from __future__ import annotations

import logging
import os

import torch

from k2serve.cpu_binding import GroupCores
from k2serve.worker.engine.engine import Engine
from k2serve.k2format.model_config import K2Config
from k2serve.worker.loader import resolve_checkpoint
from k2serve.worker.parallel.ep_group import GroupSpec
from k2serve.worker.parallel.rank import build_rank_engine, reserved_cpus

log = logging.getLogger(__name__)


def engine_in_leader(world_size: int, cores: GroupCores | None) -> bool:
    """Whether a group runs its engine in its leader (an `InLeaderGroup`): a group of one, unless the CPU plan gives
    the leaders cores apart from the ranks'."""
    return world_size == 1 and (cores is None or not cores.front_apart)


class InLeaderGroup:
    """The surface the leader uses of a group (`ExpertParallelGroup`'s), over one engine in this process."""

    def __init__(self, spec: GroupSpec) -> None:
        if spec.world_size != 1:
            raise ValueError(f"a local group has one rank, not {spec.world_size}")
        self.spec = spec
        self.moe_layers: list[int] = list(K2Config.from_dir(resolve_checkpoint(spec.model_source)).moe_layers)  # rows of `expert_load`
        self.all_to_all_bytes = 0  # no all-to-all here
        self.pids = [os.getpid()]  # the process holding rank 0 (what a kill_actor fault kills)
        self._cores = spec.rank_cores[0] if spec.rank_cores else None
        torch.set_num_threads(len(self._cores) if self._cores else reserved_cpus())
        built = build_rank_engine(str(resolve_checkpoint(spec.model_source)), spec.engine, spec.eos_ids, spec.deterministic)
        self.engine: Engine = built.engine
        self.expert_bytes = [built.expert_bytes]

    def bind_thread(self) -> None:
        """Binds the calling thread (the engine loop's; torch's worker threads, started from it, inherit it) to
        the rank's cores when the plan gave it some. Cores this process may not use are left to the OS."""
        if self._cores:
            try:
                os.sched_setaffinity(0, self._cores)  # 0: this thread only
            except OSError as e:  # none of them in this process's cpuset (a plan made for another node)
                log.warning("engine thread left unbound (cores %s): %s", self._cores, e)

    def request_ids(self) -> list[str]:
        return self.engine.request_ids

    def take_expert_load(self) -> torch.Tensor | None:
        """[num_moe_layers, E] tokens routed to each expert since the last take."""
        return self.engine.model.expert_load.take()

    def rebuild(self) -> None:
        """A fresh engine (empty KV cache and queues) over the weights already loaded."""
        vocab = self.engine.grammars.vocab if self.engine.grammars is not None else None
        self.engine = Engine(self.engine.model, self.engine.cfg, eos_token_ids=self.spec.eos_ids, grammar_vocab=vocab)

    def shutdown(self) -> None:
        """Nothing outside this process to stop: the engine goes with the leader."""
