"""CPU binding of a single-node stack (`cpu_binding: auto`): each rank gets whole cores of its own, and the
router, the group leaders and Ray share the rest.

Why: a rank's decode step is a chain of CPU work whose length is the inter-token latency. Left to the OS, the
router's and leaders' short wakeups (a few per token) land on the rank's core and preempt it; on a small node
that is several percent of ITL (bench/RESULTS.md). vLLM's CPU backend likewise reserves a core for its front end
and binds each worker's threads. On Kubernetes the Ray cluster spans pods, so there is no plan: the kubelet's CPU
manager gives Guaranteed pods exclusive cores instead.

The pool controller makes the plan (it knows every group) when the whole Ray cluster is one node with at least a
core per rank; otherwise there is no plan and the OS places every thread. With exactly a core per rank, ranks
are still kept apart (two ranks on one core while another idles cost a P/D pair ~7% of its tokens/s on 2 cores).
Ranks bind themselves when they start (`bind_own`: not to cores their node lacks), leaders when they are made;
`k2serve up` then moves itself (the router) and Ray's processes to the rest (`bind_tree`). A group's cores
belong to its slot, so a replacement group gets the same ones. Linux only (`os.sched_setaffinity`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

from pydantic import BaseModel


class GroupCores(BaseModel):
    """One group's share of a plan (crosses to the leader actor)."""

    ranks: list[list[int]]  # [world_size] cores of each rank
    front: list[int]  # the cores left to the router, the leaders and Ray

    @property
    def front_apart(self) -> bool:
        """Whether the front cores are none of the ranks' (the node had cores to spare)."""
        return set(self.front).isdisjoint(core for cores in self.ranks for core in cores)


class CorePlan(BaseModel):
    groups: dict[str, GroupCores]  # group id -> its ranks' cores
    front: list[int]


def plan_cores(groups: Sequence[tuple[str, int, float]], cores: Sequence[int]) -> CorePlan | None:
    """Cores for each rank of `groups` ((group id, world size, CPUs per rank) in launch order; a rank gets its CPUs
    rounded up to whole cores), taken from the end of `cores`, and the rest (`front`) for everything else. With
    no core to spare, the ranks still get one each, apart, and `front` is every core (the rest cannot be kept off
    them). None when the ranks need more cores than there are (or there are no ranks)."""
    ordered = sorted(cores)
    need = sum(world * max(1, math.ceil(cpus)) for _, world, cpus in groups)
    if need == 0 or need > len(ordered):
        return None
    front = ordered[: len(ordered) - need] or ordered
    taken = iter(ordered[len(ordered) - need:])
    plan = {group_id: GroupCores(ranks=[[next(taken) for _ in range(max(1, math.ceil(cpus)))] for _ in range(world)],
                                 front=front)
            for group_id, world, cpus in groups}
    return CorePlan(groups=plan, front=front)


def allowed_cores() -> list[int]:
    """The cores this process may run on (its cpuset), or none where the OS cannot say."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter is not None else []


def bind_process(cores: Iterable[int], pid: int | None = None) -> None:
    """Every thread of process `pid` (this one by default) onto `cores`; threads started later inherit it from
    the thread that starts them. A thread that ends meanwhile is skipped."""
    mask = set(cores)
    if not mask:
        raise ValueError("bind_process: no cores given")
    pid = os.getpid() if pid is None else pid
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), mask)
        except ProcessLookupError:
            continue


def bind_own(cores: Sequence[int]) -> bool:
    """This process onto `cores` if it may run on every one of them; False, nothing bound, if not (a plan made
    for another node's cores must not take a rank down)."""
    if not cores or not set(cores) <= set(allowed_cores()):
        return False
    bind_process(cores)
    return True


def bind_tree(cores: Iterable[int], skip: Iterable[int] = ()) -> None:
    """This process and its descendants but `skip` (and theirs) onto `cores`. For the process that started a local
    Ray (`k2serve up`): its children are Ray's own processes (GCS, raylet, and through the raylet every worker),
    which then start new workers on `cores` too; a rank moves itself to its own cores when it starts."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
    children: dict[int, list[int]] = {}
    for pid, parent in parent_of.items():
        children.setdefault(parent, []).append(pid)
    skipped, todo = set(skip), [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in skipped:
            continue
        try:
            bind_process(cores, pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo.extend(children.get(pid, ()))
