"""The pool controller scaling a decode pool over real Ray actors: waiting requests add a group (published to the
registry routers read); once the queue is gone the newest group drains — Health unhealthy, its running stream
finishes whole — and is removed; the decisions are counted in the controller's metrics and reported."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import ray
from prometheus_client import generate_latest

from k2serve.config import AutoscalingConfig, PoolConfig, ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.worker.parallel.pools import PoolController

PROMPT = [5, 17, 33, 2, 91, 140, 7, 64, 201, 3]
NAMESPACE = "k2serve-test-autoscale"


class Generation(threading.Thread):
    """One decode request of `n` tokens in the background: how many tokens came and how it ended."""

    def __init__(self, address: str, rid: str, n: int) -> None:
        super().__init__(daemon=True)
        self.address, self.rid, self.n = address, rid, n
        self.count = 0
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        stub = pb_grpc.WorkerGroupStub(grpc.insecure_channel(self.address))
        req = pb.DecodeRequest(request_id=self.rid, prompt=PROMPT, sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=self.n, ignore_eos=True))
        try:
            for _ in stub.Decode(req, timeout=120):
                self.count += 1
        except grpc.RpcError as e:
            self.error = e


def wait_until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def health(address: str) -> pb.HealthResponse:
    return pb_grpc.WorkerGroupStub(grpc.insecure_channel(address)).Health(pb.HealthRequest(), timeout=5)


def test_queue_adds_a_group_and_scale_down_drains_without_cutting_a_stream(ray_cluster: None,
                                                                             one_torch_thread: None) -> None:
    policy = AutoscalingConfig(min_groups=1, max_groups=2, target_queue_depth=1.0, target_running_fraction=None,
                               target_kv_use=None, interval_s=0.2, scale_up_window_s=0.4, scale_down_window_s=1.0)
    decode = PoolConfig(groups=1, kv_blocks=256, num_cpus_per_actor=0.5, max_running=1, autoscaling=policy)
    config = ServingConfig(prefill=PoolConfig(groups=0), decode=decode, cpu_binding="none")
    controller = PoolController(config, namespace=NAMESPACE, check_interval_s=0.1)
    controller.start()
    try:
        first = controller.groups(role="decode")
        assert [g["group_id"] for g in first] == ["decode-0"]
        queued = [Generation(first[0]["address"], f"q{i}", 150) for i in range(4)]  # 1 runs, 3 wait

        wait_until(lambda: len(controller.groups(role="decode")) == 2, 120, "a second decode group")
        added = next(g for g in controller.groups(role="decode") if g["group_id"] == "decode-1")
        assert added in ray.get(ray.get_actor("k2serve-registry", namespace=NAMESPACE).groups.remote())
        up = controller.scaling().pools["decode"].last
        assert up is not None and (up.from_groups, up.to_groups, up.signal) == (1, 2, "queue_depth")
        long = Generation(added["address"], "long", 2500)  # runs on the group scale-down will drain

        wait_until(lambda: controller.scaling().pools["decode"].draining == 1, 120, "scale-down to drain a group")
        down = controller.scaling().pools["decode"].last
        assert down is not None and (down.from_groups, down.to_groups) == (2, 1)
        h = health(added["address"])
        assert not h.healthy and "draining" in h.detail  # routers send it nothing new
        assert long.is_alive(), "the drained group's stream must still be running here for the test to mean much"

        wait_until(lambda: [g["group_id"] for g in controller.read_registry()] == ["decode-0"], 120,
                   "the drained group to be removed")
        long.join(10)
        assert (long.count, long.error) == (2500, None)  # finished whole before its group went away
        for q in queued:
            q.join(60)
            assert (q.count, q.error) == (150, None)
        exposition = generate_latest(controller.metrics.registry).decode()
        assert 'k2serve_autoscale_decisions_total{direction="up",pool="decode"} 1.0' in exposition
        assert 'k2serve_autoscale_decisions_total{direction="down",pool="decode"} 1.0' in exposition

        def settled() -> bool:  # the report follows the registry within a round of the controller
            state = controller.scaling().pools["decode"]
            return (state.desired, state.ready, state.draining) == (1, 1, 0)
        wait_until(settled, 10, "the report to show one serving group")
    finally:
        controller.stop()
