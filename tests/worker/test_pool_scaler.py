"""The pool controller's per-pool autoscaler (worker/parallel/pool_scaler.py): readings every interval, a decision
counted in metrics and kept for the operator's report, and the routers' TTFT as a mean over each interval; and
which worker pods the controller offers for removal."""

from __future__ import annotations

import pytest
import ray
from prometheus_client import generate_latest

from k2serve.config import AutoscalingConfig, PoolConfig, ServingConfig
from k2serve.metrics import Metrics
from k2serve.operator.render import render_children
from k2serve.operator.spec import K2DeploymentSpec
from k2serve.worker.parallel.pool_scaler import PoolScaler, RouterTtft
from k2serve.worker.parallel.pools import PoolController

POLICY = AutoscalingConfig(min_groups=1, max_groups=3, target_queue_depth=None, target_running_fraction=None,
                           target_kv_use=None, ttft_slo_s=0.5, interval_s=1.0, scale_up_window_s=2.0,
                           scale_down_window_s=4.0)
IDLE = {"running": 0, "waiting": 0, "kv_used": 0, "kv_total": 100}


def exposition(total_s: float, count: int) -> str:
    m = Metrics()
    for _ in range(count):
        m.ttft.observe(total_s / count)
    return generate_latest(m.registry).decode()


def test_router_ttft_is_the_mean_of_the_first_tokens_since_the_last_reading() -> None:
    texts = iter([exposition(2.0, 4), exposition(2.0, 4), exposition(5.0, 6), exposition(0.3, 1)])
    ttft = RouterTtft(lambda: next(texts))
    assert ttft() == 0.5  # 4 first tokens, 2 s in all
    assert ttft() is None  # none since
    assert abs((ttft() or 0) - 1.5) < 1e-9  # 2 more, 3 s more
    assert ttft() == 0.3  # the router restarted (count fell): its counters begin again


def test_scaler_reads_each_interval_decides_and_counts() -> None:
    metrics = Metrics()
    slow = iter([2.0] * 4)
    scaler = PoolScaler("prefill", POLICY, max_running=4, metrics=metrics, ttft=lambda: next(slow, None))
    assert scaler.step([IDLE], 1, 0.0) is None
    assert not scaler.due(0.5) and scaler.due(1.0)
    assert scaler.step([IDLE], 1, 1.0) is None  # 1 s of readings: the 2 s window is not covered yet
    decision = scaler.step([IDLE], 1, 2.0)
    assert decision is not None and (decision.current, decision.desired, decision.signal) == (1, 2, "ttft")
    assert scaler.last is not None and (scaler.last.seq, scaler.last.to_groups) == (1, 2)
    assert scaler.history == []  # the next decision needs a whole window of the grown pool
    text = generate_latest(metrics.registry).decode()
    assert 'k2serve_autoscale_decisions_total{direction="up",pool="prefill"} 1.0' in text
    state = scaler.report(desired=2, ready=1, draining=0, surplus_pods=[])
    assert (state.desired, state.ready, state.last) == (2, 1, scaler.last)
    assert 'k2serve_pool_desired_groups{pool="prefill"} 2.0' in generate_latest(metrics.registry).decode()


def test_a_ttft_scaled_pool_gets_the_router_metrics_in_the_cluster() -> None:
    def controller_command(spec: dict[str, object]) -> list[str]:
        children = render_children("k2", "ns", K2DeploymentSpec.model_validate(spec), service_monitor=False)
        ray = next(c for c in children if c["kind"] == "RayCluster")
        head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        return next(c for c in head if c["name"] == "pool-controller")["command"]

    assert "--router-metrics" not in controller_command({"decode": {"autoscaling": {}}})
    cmd = controller_command({"prefill": {"autoscaling": {"ttftSloS": 1.5}}})
    assert cmd[cmd.index("--router-metrics") + 1] == "http://k2-router:8000/metrics"


def test_surplus_pods_are_idle_pool_nodes_beyond_what_the_groups_need(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a cluster each Ray node is a pod; the operator removes exactly the ones named, never one a group (or a
    group's leader, which may sit on any worker pod) runs on."""
    decode = PoolConfig(groups=2, ray_resources={"k2serve_decode": 1.0}, autoscaling={"min_groups": 1})
    controller = PoolController(ServingConfig(decode=decode, prefill=PoolConfig(groups=1)))
    nodes = [{"NodeID": f"n{i}", "Alive": i != 5, "NodeManagerHostname": f"decode-pod-{i}",
              "Resources": {"CPU": 2.0, "k2serve_decode": 1.0}} for i in range(6)]
    nodes.append({"NodeID": "p0", "Alive": True, "NodeManagerHostname": "prefill-pod-0",
                  "Resources": {"CPU": 2.0, "k2serve_prefill": 1.0}})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    decode_slots = [s for s in controller._slots if s.pool == "decode"]
    decode_slots[0].info = {"node_ids": ["n0"]}
    decode_slots[1].info = {"node_ids": ["n3", "p0"]}  # its leader on the prefill pod
    # 5 live decode pods, 2 groups of EP 1 need 2: 3 to remove, the idle ones (n1, n2, n4), never n0 or n3.
    assert controller._surplus_pods("decode", 2) == ["decode-pod-1", "decode-pod-2", "decode-pod-4"]
    assert controller._surplus_pods("decode", 4) == ["decode-pod-1"]
    assert controller._surplus_pods("prefill", 1) == []  # no ray_resources of its own: not on pods of its own
