"""Every shipped fused-MoE config compiles for Hopper (sm_90) with bf16 activations, on this CPU machine.

`triton.compile` needs triton's compiling `@jit`, which TRITON_INTERPRET=1 (set by other test modules before
they import triton) replaces, so the compiles run in a child process (this file run as a script) with the
interpreter off; the tests judge its JSON report.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from pydantic import ValidationError

from k2serve.worker.quant.triton_config import (
    ConfigFile, config_path, load_config_file, lookup_config, shape_key, shipped_config_files,
)

SM90 = ("cuda", 90, 32)
K2_TOP_K = 8  # the '*' shape stands for any shard; K2 routes each token to 8 experts
POINTERS = {"w_ptr": "*i32", "sorted_slots_ptr": "*i32", "block_expert_ptr": "*i32", "routing_ptr": "*fp32"}
SCALARS = ["num_slots", "N", "K", "stride_am", "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_om"]


def _top_k(shape: str) -> int:
    found = re.search(r"k=(\d+)", shape)
    return int(found.group(1)) if found else K2_TOP_K


def _compile_gemm(phase: str, top_k: int, block_m: int, tiles: dict[str, int]) -> str:
    """'' when it compiles, else the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from k2serve.worker.quant.triton_kernels import int4_moe_gemm_kernel

    gated = phase == "gate_up"
    signature = {
        "a_ptr": "*bf16", "s_ptr": "*bf16", "out_ptr": "*bf16" if gated else "*fp32", **POINTERS,
        **dict.fromkeys(SCALARS, "i32"),
    }
    constexprs = {
        "A_ROW_DIV": top_k if gated else 1, "GATED": gated, "MUL_ROUTING": not gated, "DOT_PRECISION": "tf32",
        "BLOCK_M": block_m, "BLOCK_N": tiles["block_n"], "BLOCK_K": tiles["block_k"],
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    try:
        triton.compile(
            ASTSource(int4_moe_gemm_kernel, signature, constexprs=constexprs),
            target=GPUTarget(*SM90),
            options={"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]},
        )
    except Exception as exc:  # the report carries any compiler failure to the test
        return f"{type(exc).__name__}: {exc}"[:2000]
    return ""


def _compile_combine() -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from k2serve.worker.quant.triton_kernels import combine_slots_kernel
    from k2serve.worker.quant.triton_moe import COMBINE_BLOCK_H

    signature = {"slots_ptr": "*fp32", "out_ptr": "*bf16", "H": "i32", "TOP_K": "constexpr", "BLOCK_H": "constexpr"}
    try:
        triton.compile(
            ASTSource(combine_slots_kernel, signature, constexprs={"TOP_K": K2_TOP_K, "BLOCK_H": COMBINE_BLOCK_H}),
            target=GPUTarget(*SM90),
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:2000]
    return ""


def _child() -> dict[str, Any]:
    """{'file|shape|bucket|phase': error or ''} for every shipped config, plus the combine kernel and a tile
    that sm_90 must reject (proof that a failing compile shows up)."""
    report: dict[str, str] = {}
    done: dict[str, str] = {}
    for path in shipped_config_files():
        for shape, buckets in load_config_file(path).shapes.items():
            for bucket, cfg in buckets.items():
                for phase in ("gate_up", "down"):
                    tiles = getattr(cfg, phase).model_dump()
                    args = (phase, _top_k(shape), cfg.block_m, tiles)
                    key = json.dumps(args, sort_keys=True)
                    if key not in done:
                        done[key] = _compile_gemm(*args)
                    report[f"{path.name}|{shape}|{bucket}|{phase}"] = done[key]
    report["combine"] = _compile_combine()
    too_small = {"block_n": 64, "block_k": 16, "num_warps": 4, "num_stages": 2}
    report["control_block_k_16"] = _compile_gemm("gate_up", K2_TOP_K, 16, too_small)
    return report


@pytest.fixture(scope="module")
def report() -> dict[str, str]:
    from helpers.child import run_script_report  # not at the top: this file also runs as a plain script

    return run_script_report(__file__, interpret=False, timeout_s=300)


def _shipped() -> list[str]:
    return [
        f"{path.name}|{shape}|{bucket}|{phase}"
        for path in shipped_config_files()
        for shape, buckets in load_config_file(path).shapes.items()
        for bucket in buckets
        for phase in ("gate_up", "down")
    ]


def test_configs_are_shipped() -> None:
    assert any(key.startswith("default.json|") for key in _shipped())


@pytest.mark.parametrize("key", _shipped())
def test_shipped_config_compiles_for_sm90(report: dict[str, str], key: str) -> None:
    assert report[key] == "", report[key]


def test_combine_compiles_for_sm90(report: dict[str, str]) -> None:
    assert report["combine"] == "", report["combine"]


def test_compile_rejects_an_illegal_tile(report: dict[str, str]) -> None:
    assert report["control_block_k_16"] != ""


def test_unknown_device_gets_the_default_buckets() -> None:
    default = load_config_file(config_path("default")).shapes["*"]
    shape = shape_key(24, 7168, 2048, 8)
    assert lookup_config("Imaginary GPU 9000", shape, 1) == default[1]
    assert lookup_config("Imaginary GPU 9000", shape, 9) == default[32]  # smallest bucket that holds 9 tokens
    assert lookup_config("Imaginary GPU 9000", shape, 10**6) == default[max(default)]
    # Deterministic mode: one config whatever the batch.
    assert lookup_config("Imaginary GPU 9000", shape, None) == default[min(default)]


@pytest.mark.parametrize(
    ("tiles", "complaint"),
    [({"block_n": 64, "block_k": 16}, "block_k"), ({"block_n": 48, "block_k": 64}, "power of two")],
)
def test_illegal_tiles_are_refused_with_their_name(tiles: dict[str, int], complaint: str) -> None:
    bad = {"device": "x", "source": "test", "shapes": {"*": {"1": {"block_m": 16, "gate_up": tiles, "down": tiles}}}}
    with pytest.raises(ValidationError, match=complaint):
        ConfigFile.model_validate(bad)


if __name__ == "__main__":
    print(json.dumps(_child()))
