"""CPU binding (`cpu_binding: auto`, k2serve/cpu_binding.py): the plan, binding a live process's threads, a pool
controller's group whose rank runs on a core of its own while its leader stays off it, and — with no core to spare —
groups of one whose engine threads run on their ranks' cores inside their leaders."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import grpc
import pytest
from helpers.tiny import run_all, tiny_engine

from k2serve.config import PoolConfig, ServingConfig
from k2serve.cpu_binding import CorePlan, GroupCores, allowed_cores, bind_own, bind_process, plan_cores
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.parallel.in_leader_group import engine_in_leader
from k2serve.worker.parallel.pools import PoolController


def thread_cores(pid: int) -> dict[int, set[int]]:
    """Each live thread of `pid` and the cores it may run on."""
    out: dict[int, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            out[int(tid)] = os.sched_getaffinity(int(tid))
    return out


def test_ranks_take_whole_cores_from_the_end_and_leave_the_rest() -> None:
    assert plan_cores([("both-0", 1, 1.0)], [1, 0]) == CorePlan(
        groups={"both-0": GroupCores(ranks=[[1]], front=[0])}, front=[0])
    plan = plan_cores([("prefill-0", 1, 1.5), ("decode-0", 2, 0.5)], range(8))
    assert plan is not None and plan.front == [0, 1, 2, 3]
    assert plan.groups["prefill-0"].ranks == [[4, 5]]  # 1.5 CPUs: two whole cores
    assert plan.groups["decode-0"].ranks == [[6], [7]]  # a fraction still gets a core of its own
    # A core per rank and none to spare: the ranks still apart, everything else anywhere.
    assert plan_cores([("prefill-0", 1, 1.0), ("decode-0", 1, 1.0)], [0, 1]) == CorePlan(
        groups={"prefill-0": GroupCores(ranks=[[0]], front=[0, 1]), "decode-0": GroupCores(ranks=[[1]], front=[0, 1])},
        front=[0, 1])
    # Whether the leaders have cores apart decides where a group of one runs its engine (in_leader_group.py).
    two = plan_cores([("prefill-0", 1, 1.0), ("decode-0", 1, 1.0)], [0, 1])
    assert two is not None and not two.groups["decode-0"].front_apart
    assert engine_in_leader(1, two.groups["decode-0"]) and engine_in_leader(1, None)
    spare = plan_cores([("both-0", 1, 1.0)], [1, 0])
    assert spare is not None and spare.groups["both-0"].front_apart
    assert not engine_in_leader(1, spare.groups["both-0"]) and not engine_in_leader(2, None)
    # More rank cores than cores, or no ranks at all: no plan, the OS places every thread.
    assert plan_cores([("both-0", 3, 1.0)], [0, 1, 2]) is not None
    assert plan_cores([("both-0", 2, 1.0), ("both-1", 1, 1.5)], [0, 1, 2]) is None
    assert plan_cores([], [0, 1]) is None


def test_bind_process_moves_every_thread_of_a_running_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('up', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        last = allowed_cores()[-1]
        bind_process([last], child.pid)
        threads = thread_cores(child.pid)
        assert len(threads) == 4 and all(cores == {last} for cores in threads.values())
        with pytest.raises(ValueError, match="no cores"):
            bind_process([], child.pid)
    finally:
        child.kill()
        child.wait()


def test_cores_this_process_may_not_run_on_are_not_bound() -> None:
    """A plan made on another node (cores this one lacks) must not take down the rank: it runs unbound."""
    before = allowed_cores()
    assert not bind_own([max(before) + 1000]) and not bind_own([])
    assert allowed_cores() == before


PROMPT = [5, 17, 33, 2, 91]
MAX_TOKENS = 64  # enough steps that the thread running them is its process's busiest


def expected() -> list[int]:
    engine = tiny_engine(deterministic=True)
    engine.add_request("x", PROMPT, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return run_all(engine)["x"]


TREE = """
import os, subprocess, sys
from k2serve.cpu_binding import bind_tree
SLEEPER = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "print(c.pid, flush=True); time.sleep(60)")
every = sorted(os.sched_getaffinity(0))
kept, moved = (subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True) for _ in "ab")
kept_child, moved_child = int(kept.stdout.readline()), int(moved.stdout.readline())
bind_tree([every[-1]], skip=[kept.pid])
cores = {pid: sorted(set().union(*(os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task"))))
         for pid in (os.getpid(), moved.pid, moved_child, kept.pid, kept_child)}
for pid in (kept_child, moved_child, kept.pid, moved.pid):
    os.kill(pid, 9)
print(list(cores.values()) == [[every[-1]]] * 3 + [every] * 2, cores)
"""


def test_bind_tree_moves_a_process_and_its_descendants_but_the_skipped() -> None:
    out = subprocess.run([sys.executable, "-c", TREE], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("True"), out.stdout + out.stderr


def serve_one(address: str) -> list[int]:
    stub = pb_grpc.WorkerGroupStub(grpc.insecure_channel(address))
    req = pb.DecodeRequest(request_id="bound", prompt=PROMPT, deterministic=True,
                           sampling=pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [ev.token for ev in stub.Decode(req, timeout=60)]


def thread_cpu(pid: int) -> dict[int, int]:
    """Each live thread of `pid` and its CPU time so far (clock ticks)."""
    out: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


@pytest.mark.parametrize("binding", ["auto", "none"])
def test_a_groups_rank_runs_on_its_own_core_and_its_leader_off_it(ray_cluster: None, binding: str) -> None:
    pool = PoolConfig(groups=1, kv_blocks=256, num_cpus_per_actor=1.0)
    config = ServingConfig(deterministic=True, prefill=pool, decode=PoolConfig(groups=0), cpu_binding=binding,
                           router={"aggregated": True})  # type: ignore[arg-type]
    controller = PoolController(config, namespace=f"k2serve-test-cpus-{binding}")
    controller.start()
    try:
        cores = allowed_cores()
        group = controller.groups()[0]
        rank_pid, leader_pid = group["rank_pids"][0], group["leader_pid"]
        # The leader has a core apart from the rank's: the rank is an actor of its own (in_leader_group.py, engine_in_leader).
        assert (rank_pid == leader_pid) == (controller.cores is None)
        rank_threads, leader_threads = thread_cores(rank_pid), thread_cores(leader_pid)
        if binding == "none" or len(cores) < 2:  # no plan: every thread may run anywhere
            assert controller.cores is None
            assert all(c == set(cores) for c in [*rank_threads.values(), *leader_threads.values()])
        else:
            assert controller.cores is not None
            assert controller.cores.groups[group["group_id"]].ranks == [[cores[-1]]]
            assert controller.cores.front == cores[:-1]
            assert all(c == {cores[-1]} for c in rank_threads.values())
            assert all(c == set(cores[:-1]) for c in leader_threads.values())
        assert serve_one(group["address"]) == expected()  # and it serves the same tokens
    finally:
        controller.stop()


def test_with_no_core_to_spare_each_engine_runs_in_its_leader_on_its_ranks_core(ray_cluster: None) -> None:
    """P/D with a core per rank and none to spare: each group of one steps its engine in its leader
    (worker/parallel/in_leader_group.py) — the thread that runs the model (the leader's busiest while it serves) is
    bound to the rank's core, the leader's other threads may run anywhere."""
    # Half the cores per rank (one each on CI's 2): the two ranks take them all.
    pool = PoolConfig(groups=1, kv_blocks=256, num_cpus_per_actor=max(1.0, len(allowed_cores()) / 2))
    config = ServingConfig(deterministic=True, prefill=pool, decode=pool)
    controller = PoolController(config, namespace="k2serve-test-cpus-pd")
    controller.start()
    try:
        for group in controller.groups():
            leader_pid = group["leader_pid"]
            assert group["rank_pids"] == [leader_pid]  # no rank actor: rank 0 lives in the leader
            before = thread_cpu(leader_pid)
            assert serve_one(group["address"]) == expected()  # and it serves the same tokens
            after = thread_cpu(leader_pid)
            engine_tid = max(after, key=lambda t: after[t] - before.get(t, 0))
            threads = thread_cores(leader_pid)
            if controller.cores is None:  # fewer than 2 cores (or an odd count): no plan, every thread anywhere
                assert all(c == set(allowed_cores()) for c in threads.values())
                continue
            rank_cores = controller.cores.groups[group["group_id"]].ranks
            assert len(rank_cores) == 1 and not controller.cores.groups[group["group_id"]].front_apart
            assert threads.pop(engine_tid) == set(rank_cores[0])
            assert all(c == set(controller.cores.front) for c in threads.values())
    finally:
        controller.stop()
