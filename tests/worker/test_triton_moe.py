"""The Triton fused MoE under TRITON_INTERPRET=1 against the torch reference.

The interpreter must be chosen before triton is first imported, and another test module may already have
imported triton into this pytest process, so the kernels run in a child process (this file run as a script)
that reports its measurements as JSON; the tests below judge them. The error measure is
max|out - ref| / max|ref| over every output element; every buffer the kernels fill is NaN-poisoned first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from k2serve.worker.quant.triton_config import ConfigFile

REPO = Path(__file__).resolve().parents[2]
# name -> (activation dtype, tokens, top_k, combine, deterministic, explicit config?)
CASES: dict[str, tuple[str, int, int, bool, bool, bool]] = {
    "fp32_combine": ("float32", 7, 3, True, False, True),
    "fp32_slots": ("float32", 7, 3, False, False, True),
    "fp16_combine": ("float16", 7, 3, True, False, True),
    "fp16_slots": ("float16", 7, 3, False, False, True),
    "fp16_many_blocks_per_expert": ("float16", 37, 2, True, False, True),
    "fp32_default_config": ("float32", 5, 3, True, False, False),
    "fp32_deterministic": ("float32", 9, 3, True, True, False),
}
TOLERANCE = {"float32": 1e-3, "float16": 1e-2}
NUM_EXPERTS, START, NUM_LOCAL, HIDDEN, INTER = 8, 2, 4, 64, 96
EMPTY_EXPERT = 3  # global id of an owned expert that no token picks
# Three N tiles for gate_up (I=96 / 32), and a partial last K tile for down (I=96 with block_k 64).
SMALL_CONFIG = {
    "block_m": 16,
    "gate_up": {"block_n": 32, "block_k": 32},
    "down": {"block_n": 64, "block_k": 64},
}


def _child() -> dict[str, Any]:
    """Runs with TRITON_INTERPRET=1: every case's measurements."""
    from unittest import mock

    import torch

    from k2serve.worker.quant.moe import ExpertShard, reference_moe
    from k2serve.worker.quant.triton_config import MoEConfig
    from k2serve.worker.quant import triton_moe
    from k2serve.worker.quant.triton_moe import align_slots, fused_moe

    torch.manual_seed(0)
    empty = torch.empty

    def poisoned_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    def words(*shape: int) -> torch.Tensor:  # fresh random packed words: every nibble value, sign bit set or not
        return torch.randint(-(2**31), 2**31, shape, dtype=torch.int64).to(torch.int32)

    def scales(*shape: int) -> torch.Tensor:
        return (torch.rand(shape) * 0.03 + 0.01).to(torch.bfloat16)

    shard = ExpertShard(
        START, NUM_EXPERTS,
        words(NUM_LOCAL, 2 * INTER, HIDDEN // 8), words(NUM_LOCAL, HIDDEN, INTER // 8),
        scales(NUM_LOCAL, 2 * INTER, HIDDEN // 32), scales(NUM_LOCAL, HIDDEN, INTER // 32),
    )
    allowed = torch.tensor([e for e in range(NUM_EXPERTS) if e != EMPTY_EXPERT])

    def routing(tokens: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(tokens)])  # [T, k]
        return ids, torch.rand(tokens, top_k) + 0.1

    def run(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, **kw: Any) -> torch.Tensor:
        with mock.patch.object(torch, "empty", poisoned_empty):
            return fused_moe(x, ids, w, shard, **kw)

    small = MoEConfig.model_validate(SMALL_CONFIG)
    out: dict[str, Any] = {}
    for name, (dtype_name, tokens, top_k, combine, deterministic, explicit) in CASES.items():
        dtype = getattr(torch, dtype_name)
        x = torch.randn(tokens, HIDDEN).to(dtype)
        ids, w = routing(tokens, top_k)
        cfg = {"config": small} if explicit else {}
        got = run(x, ids, w, combine=combine, deterministic=deterministic, **cfg).float()
        ref = reference_moe(x, ids, w, shard, combine=combine).float()
        case = {
            "shape_ok": list(got.shape) == list(ref.shape),
            "finite": bool(torch.isfinite(got).all()),
            "ref_max": float(ref.abs().max()),
            "rel_err": float((got - ref).abs().max() / ref.abs().max()),
        }
        if deterministic:
            lookup = mock.patch.object(triton_moe, "lookup_config", side_effect=triton_moe.lookup_config)
            with lookup as spy:
                rows = [run(x[i : i + 1], ids[i : i + 1], w[i : i + 1], deterministic=True) for i in range(tokens)]
            alone = torch.cat(rows)
            case["lookup_batch_args"] = sorted({str(c.args[2]) for c in spy.call_args_list})
            case["batch_vs_alone_max_diff"] = float((alone.float() - got).abs().max())
        out[name] = case

    x = torch.randn(5, HIDDEN)
    foreign = torch.tensor([[0, 1], [6, 7], [1, 6], [7, 0], [0, 6]])  # experts this shard does not own
    got = run(x, foreign, torch.rand(5, 2), config=small)
    out["no_owned_tokens"] = {"finite": bool(torch.isfinite(got).all()), "max_abs": float(got.abs().max())}
    got = run(x[:0], foreign[:0], torch.rand(0, 2), config=small)
    out["empty_batch"] = {"shape": list(got.shape)}

    ids, _ = routing(13, 3)
    aligned = align_slots(ids, START, NUM_LOCAL, 4)
    slots, experts = aligned.sorted_slots.tolist(), aligned.block_expert.tolist()
    local = (ids.reshape(-1) - START).tolist()
    runs = [
        (e, [s for s in slots[4 * b : 4 * b + 4] if s != ids.numel()]) for b, e in enumerate(experts) if e >= 0
    ]
    out["align"] = {
        "blocks_hold_their_expert": all(local[s] == e for e, run_ in runs for s in run_),
        "owned_slots_once": sorted(s for _, run_ in runs for s in run_)
        == [s for s, e in enumerate(local) if 0 <= e < NUM_LOCAL],
        "expert_ids_ascending": [e for e, _ in runs] == sorted(e for e, _ in runs),
        "empty_expert_has_no_block": EMPTY_EXPERT - START not in {e for e, _ in runs},
        "tail_blocks_skipped": experts[len(runs) :] == [-1] * (len(experts) - len(runs)),
    }
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from helpers.child import run_script_report  # not at the top: this file also runs as a plain script

    return run_script_report(__file__, interpret=True, timeout_s=300)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results: dict[str, Any], name: str) -> None:
    case = results[name]
    assert case["shape_ok"] and case["finite"], case
    assert case["ref_max"] > 0, "the reference is all zeros: the case checks nothing"
    assert case["rel_err"] <= TOLERANCE[CASES[name][0]], case


def test_deterministic_rows_do_not_depend_on_the_batch(results: dict[str, Any]) -> None:
    assert results["fp32_deterministic"]["batch_vs_alone_max_diff"] == 0.0
    # The interpreter is batch-invariant anyway; on a GPU it is the pinned config (no batch bucket) that makes it so.
    assert results["fp32_deterministic"]["lookup_batch_args"] == ["None"]


def test_tokens_of_other_shards_give_zeros(results: dict[str, Any]) -> None:
    assert results["no_owned_tokens"] == {"finite": True, "max_abs": 0.0}


def test_empty_batch(results: dict[str, Any]) -> None:
    assert results["empty_batch"]["shape"] == [0, HIDDEN]


def test_align_groups_pads_and_skips(results: dict[str, Any]) -> None:
    failed = [check for check, ok in results["align"].items() if not ok]
    assert not failed, failed


def _script(*argv: str) -> None:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_benchmark_smoke(tmp_path: Path) -> None:
    """bench/kernel_moe.py end to end on the interpreter: every (EP, batch) row measured and numerically sane."""
    report = tmp_path / "bench.json"
    _script("bench/kernel_moe.py", "--smoke", "--json", str(report))
    rows = json.loads(report.read_text())["rows"]
    assert {(r["ep"], r["batch"]) for r in rows} == {(2, 1), (2, 3), (4, 1), (4, 3)}
    for r in rows:
        assert r["fused_us"] > 0 and r["torch_us"] > 0 and r["floor_us"] > 0, r
        assert r["fused_mb"] < r["torch_mb"], "packed INT4 must move fewer bytes than dense weights"
        assert r["max_rel_err_vs_torch"] <= TOLERANCE["float16"], r


def test_tuning_smoke_writes_a_loadable_config(tmp_path: Path) -> None:
    _script("-m", "k2serve.worker.quant.tune", "--smoke", "--out", str(tmp_path))
    written = ConfigFile.model_validate_json((tmp_path / "cpu.json").read_text())
    assert written.device == "cpu" and "--smoke" in written.source
    assert {shape: set(b) for shape, b in written.shapes.items()} == {"E=4,H=64,I=64,k=2": {1, 5}}


if __name__ == "__main__":
    print(json.dumps(_child()))
