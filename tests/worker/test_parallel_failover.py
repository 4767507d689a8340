"""Failures of worker groups over real Ray actors: a rank's process killed mid-decode fails the group within 5 s
naming the lost requests and the rebuilt group serves correctly within 30 s; a group of one whose step raises is
rebuilt in place; under the pool controller, a whole decode group killed by a configured fault leaves the other
serving and is replaced (and counts a restart)."""

from __future__ import annotations

import asyncio

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import ray
from helpers.tiny import run_all, tiny_engine

from k2serve.router.directory import RegistryDirectory
from k2serve.config import FaultSpec, PoolConfig, ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.parallel.leader import GroupLeader
from k2serve.worker.parallel.pools import PoolController

PROMPT = [5, 17, 33, 2, 91, 140, 7, 64, 201, 3]


def pool(ep: int, groups: int = 1) -> PoolConfig:
    return PoolConfig(groups=groups, expert_parallel=ep, kv_blocks=256, num_cpus_per_actor=0.5)


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    engine = tiny_engine(deterministic=True)
    engine.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return run_all(engine)["x"]


def decode(address: str, request_id: str, prompt: list[int], max_tokens: int) -> Iterator[pb.TokenEvent]:
    stub = pb_grpc.WorkerGroupStub(grpc.insecure_channel(address))
    req = pb.DecodeRequest(request_id=request_id, prompt=prompt, deterministic=True,
                           sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return stub.Decode(req, timeout=60)


def tokens(address: str, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    return [ev.token for ev in decode(address, request_id, prompt, max_tokens)]


class Stream(threading.Thread):
    """One long decode stream in the background: counts tokens, records when and how it ended."""

    def __init__(self, address: str, request_id: str) -> None:
        super().__init__(daemon=True)
        self.address, self.request_id = address, request_id
        self.count = 0
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            for _ in decode(self.address, self.request_id, PROMPT, 4000):
                self.count += 1
        except grpc.RpcError as e:
            self.error = e
        self.ended_at = time.monotonic()


def wait_until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def test_killed_rank_fails_group_fast_and_group_serves_again(ray_cluster: None, one_torch_thread: None) -> None:
    config = ServingConfig(deterministic=True, decode=pool(ep=2))
    leader = ray.remote(GroupLeader).options(num_cpus=0.1).remote(config, "decode", 0, "decode",
                                                                    collective_timeout_s=10.0)
    try:
        info = ray.get(leader.start.remote(), timeout=120)
        streams = [Stream(info["address"], f"long-{i}") for i in range(3)]
        for s in streams:
            s.start()
        wait_until(lambda: all(s.count >= 3 for s in streams), 30, "decoding on both ranks")

        killed_at = time.monotonic()
        os.kill(info["rank_pids"][1], signal.SIGKILL)
        for s in streams:
            s.join(10)
        assert all(s.error is not None and s.ended_at - killed_at <= 5.0 for s in streams), \
            [(s.error, s.ended_at - killed_at) for s in streams]
        for s in streams:
            assert s.request_id in s.error.details()  # the stream's error names what was lost
        wait_until(lambda: ray.get(leader.failure_log.remote()), 5 - (time.monotonic() - killed_at),
                   "the leader to log the failure")
        failure = ray.get(leader.failure_log.remote())[0]
        assert set(failure["request_ids"]) == {s.request_id for s in streams}

        want = expected(PROMPT, 12)
        got: list[int] = []

        def served() -> bool:
            try:
                got[:] = tokens(info["address"], f"after-{time.monotonic()}", PROMPT, 12)
                return True
            except grpc.RpcError:
                return False

        wait_until(served, 30 - (time.monotonic() - killed_at), "a correct answer from the rebuilt group")
        print(f"rank killed -> streams failed in {max(s.ended_at for s in streams) - killed_at:.2f} s, "
              f"served again after {time.monotonic() - killed_at:.1f} s")
        assert got == want
        new_pids = ray.get(leader.rank_pids.remote())
        assert info["rank_pids"][1] not in new_pids and len(new_pids) == 2
    finally:
        ray.get(leader.stop.remote(), timeout=30)
        ray.kill(leader)


@pytest.mark.parametrize("ep, kind", [(2, "kill_group"), (1, "kill_actor")])
def test_pool_controller_replaces_a_killed_decode_group(ray_cluster: None, one_torch_thread: None, ep: int,
                                                        kind: str) -> None:
    """kill_group kills a group's ranks and leader; kill_actor on a group of one kills its leader, where its
    engine runs. Either way the controller replaces the group once: the fault does not fire again."""
    config = ServingConfig(deterministic=True, prefill=pool(ep=1, groups=0), decode=pool(ep=ep, groups=2),
                           faults=[FaultSpec(kind=kind, pool="decode", group=0, after_tokens=5)],
                           cpu_binding="none")  # no plan: a group of one's engine is in its leader (in_leader_group.py)
    controller = PoolController(config, namespace="k2serve-test-pools", check_interval_s=0.2)
    controller.start()
    try:
        groups = {g["group_id"]: g for g in controller.groups(role="decode")}
        assert sorted(groups) == ["decode-0", "decode-1"]
        assert controller.groups(role="prefill") == []
        assert sorted(g["group_id"] for g in controller.read_registry()) == ["decode-0", "decode-1"]
        old = groups["decode-0"]

        with pytest.raises(grpc.RpcError):  # the fault kills decode-0 (leader and ranks) after 5 tokens
            tokens(old["address"], "doomed", PROMPT, 50)
        want = expected(PROMPT, 12)
        assert tokens(groups["decode-1"]["address"], "other", PROMPT, 12) == want  # the other keeps serving

        def replaced() -> bool:  # in the controller and in the registry routers read (published just after)
            now = {g["group_id"]: g for g in controller.groups(role="decode")}
            listed = {g["group_id"]: g for g in controller.read_registry()}
            return (len(now) == 2 and now["decode-0"]["leader_pid"] != old["leader_pid"]
                    and listed.get("decode-0") == now["decode-0"])

        wait_until(replaced, 60, "the controller to replace decode-0 and publish it")
        new = next(g for g in controller.read_registry() if g["group_id"] == "decode-0")
        assert new["leader_pid"] != old["leader_pid"]
        # What a router process reads (k2serve.router.process without --group): the replacement's address.
        listed = asyncio.run(RegistryDirectory("k2serve-test-pools").list_groups())
        assert {(a.group_id, a.role, a.address) for a in listed} == {
            ("decode-0", "decode", new["address"]), ("decode-1", "decode", groups["decode-1"]["address"])}
        assert tokens(new["address"], "revived", PROMPT, 12) == want  # fault fired its one time: it serves
        assert controller.replacements == 1
        restarts = 'k2serve_worker_group_restarts_total{role="decode"} 1.0'
        texts = controller.metrics_texts()
        # every leader exports the series from its start (at 0); only the replacement counted one
        assert restarts in texts["decode-0"] and restarts.replace("1.0", "0.0") in texts["decode-1"]
    finally:
        controller.stop()


def test_a_group_of_one_whose_step_fails_is_rebuilt_in_place(ray_cluster: None, one_torch_thread: None) -> None:
    """A group of one steps its engine in the leader's process (worker/parallel/in_leader_group.py): a step that raises
    ends the in-flight stream with an error naming its request, and the leader serves again on the same address
    from a fresh engine."""
    config = ServingConfig(deterministic=True, decode=pool(ep=1))

    async def scenario() -> None:
        leader = GroupLeader(config, "decode", 0, "decode")
        info = await leader.start()
        try:
            assert info["rank_pids"] == [os.getpid()] and info["world_size"] == 1  # no rank actor
            group = leader._group
            broken = group.engine
            steps = 0

            def failing_step() -> list[Any]:
                nonlocal steps
                steps += 1
                if steps == 4:
                    raise RuntimeError("injected step failure")
                return type(broken).step(broken)

            broken.step = failing_step  # type: ignore[method-assign]
            async with grpc.aio.insecure_channel(info["address"]) as channel:
                stub = pb_grpc.WorkerGroupStub(channel)

                async def decode_aio(request_id: str, max_tokens: int) -> list[int]:
                    req = pb.DecodeRequest(request_id=request_id, prompt=PROMPT, deterministic=True,
                                           sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                      ignore_eos=True))
                    return [ev.token async for ev in stub.Decode(req, timeout=60)]

                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await decode_aio("doomed", 50)
                assert "doomed" in (failed.value.details() or "")
                deadline = time.monotonic() + 10
                while not leader.failure_log() or leader.failure_log()[0]["recovered_at"] is None:
                    assert time.monotonic() < deadline, "the leader did not rebuild the group"
                    await asyncio.sleep(0.05)
                assert leader.failure_log()[0]["request_ids"] == ["doomed"]
                assert group.engine is not broken  # a fresh engine, the weights kept
                assert group.engine.model is broken.model
                assert await decode_aio("after", 12) == expected(PROMPT, 12)
                assert leader.info()["address"] == info["address"] and leader.info()["healthy"]
                assert 'k2serve_worker_group_restarts_total{role="decode"} 1.0' in leader.metrics_text()
        finally:
            await leader.stop()

    asyncio.run(scenario())
