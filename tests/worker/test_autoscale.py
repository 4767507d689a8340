"""The autoscaling decision (worker/parallel/autoscale.py): signals → group counts, stabilisation windows, one
step at a time within [min_groups, max_groups]; and the config's refusal of a bad range."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2serve.config import AutoscalingConfig, PoolConfig, ServingConfig
from k2serve.worker.parallel.autoscale import PoolLoad, Reading, decide, read

POLICY = AutoscalingConfig(min_groups=1, max_groups=3, target_queue_depth=2.0, target_running_fraction=0.8,
                           target_kv_use=0.85, scale_up_window_s=10, scale_down_window_s=30)


def load(groups: int = 1, waiting: int = 0, running: int = 0, kv_used: int = 0, ttft_s: float | None = None
         ) -> PoolLoad:
    return PoolLoad(groups=groups, waiting=waiting, running=running, kv_used=kv_used, kv_total=100 * groups,
                    max_running=4, ttft_s=ttft_s)


def readings(policy: AutoscalingConfig, loads: list[PoolLoad], every_s: float = 2.0) -> list[Reading]:
    return [read(policy, x, i * every_s) for i, x in enumerate(loads)]


@pytest.mark.parametrize(("reading", "wanted", "signal"), [
    (load(1, waiting=6, running=4), 3, "queue_depth"),  # 6 waiting / target 2 → 3 groups
    (load(2, waiting=0, running=8, kv_used=50), 3, "running"),  # 8/(2·4) = 1.0 vs 0.8 → ceil(2·1.25) = 3
    (load(1, running=1, kv_used=95), 2, "kv_use"),  # 0.95 vs 0.85 → ceil(1.12) = 2
    (load(2, running=6, kv_used=160), 2, "running"),  # 0.75 vs 0.8 and 0.8 vs 0.85: within tolerance, stay
    (load(3, running=2, kv_used=30), 1, "running"),  # 2/12 = 0.17 vs 0.8 → ceil(0.62) = 1
])
def test_a_reading_asks_what_its_most_demanding_signal_needs(reading: PoolLoad, wanted: int, signal: str) -> None:
    got = read(POLICY, reading, 0.0)
    assert (got.wanted, got.signal) == (wanted, signal)


def test_ttft_over_its_slo_asks_for_more_groups_only_when_configured() -> None:
    slow = load(2, running=4, kv_used=100, ttft_s=3.0)
    assert read(POLICY, slow, 0.0).wanted == 2  # no ttft_slo_s: TTFT is not a signal
    with_slo = POLICY.model_copy(update={"ttft_slo_s": 1.0})
    got = read(with_slo, slow, 0.0)
    assert (got.wanted, got.signal) == (6, "ttft") and "3.00 s TTFT vs target 1" in got.detail


def test_scale_up_waits_for_a_whole_window_of_demand_then_adds_one_group() -> None:
    busy = [load(1, waiting=6, running=4)] * 6  # readings at 0, 2, ..., 10 s
    history = readings(POLICY, busy)
    assert decide(POLICY, history[:5], 1, 8.0).direction == "none"  # 8 s of history: window not yet covered
    d = decide(POLICY, history, 1, 10.0)
    assert (d.desired, d.signal) == (2, "queue_depth")  # asks for 3, but one group at a time
    assert "queue_depth 6.00 waiting/group vs target 2" in d.reason


def test_a_burst_inside_the_window_does_not_scale_up() -> None:
    loads = [load(1, waiting=6, running=4)] * 3 + [load(1, running=3, kv_used=60)] + [load(1, waiting=6, running=4)] * 2
    assert decide(POLICY, readings(POLICY, loads), 1, 10.0).direction == "none"


def test_scale_down_needs_the_whole_down_window_quiet_and_drains_one_group() -> None:
    quiet = [load(3)] * 16  # 0 .. 30 s
    history = readings(POLICY, quiet)
    assert decide(POLICY, history[:15], 3, 28.0).direction == "none"
    d = decide(POLICY, history, 3, 30.0)
    assert (d.desired, d.direction) == (2, "down")
    busy_once = quiet[:8] + [load(3, running=12)] + quiet[9:]
    assert decide(POLICY, readings(POLICY, busy_once), 3, 30.0).direction == "none"


def test_never_outside_min_and_max() -> None:
    flooded = readings(POLICY, [load(3, waiting=60, running=12)] * 6)
    assert decide(POLICY, flooded, 3, 10.0).desired == 3
    idle = readings(POLICY, [load(1)] * 16)
    assert decide(POLICY, idle, 1, 30.0).desired == 1
    assert (decide(POLICY, [], 5, 0.0).desired, decide(POLICY, [], 5, 0.0).signal) == (4, "range")
    assert decide(POLICY, [], 0, 0.0).desired == 1


@pytest.mark.parametrize(("fields", "named"), [
    ({"min_groups": 3, "max_groups": 2}, "min_groups (3) must not exceed max_groups (2)"),
    ({"min_groups": 0}, "min_groups"),
    ({"max_groups": -1}, "max_groups"),
    ({"target_queue_depth": -1}, "target_queue_depth"),
    ({"target_kv_use": 1.5}, "target_kv_use"),
])
def test_bad_ranges_are_refused_naming_the_field(fields: dict[str, float], named: str) -> None:
    with pytest.raises(ValidationError) as e:
        ServingConfig.model_validate({"decode": {"autoscaling": fields}})
    assert named in str(e.value) and "decode.autoscaling" in str(e.value)


def test_initial_groups_are_clamped_into_the_range() -> None:
    assert PoolConfig(groups=1, autoscaling={"min_groups": 2, "max_groups": 3}).initial_groups() == 2
    assert PoolConfig(groups=9, autoscaling={"min_groups": 1, "max_groups": 3}).initial_groups() == 3
    assert PoolConfig(groups=9).initial_groups() == 9
