"""The MLA attention kernels compile for Hopper (sm_90) at K2's real dimensions (c 512, r 64, nope 128, v 128; 64
heads on one rank, or a tensor-parallel shard of them), on this CPU machine, and their shared memory fits an
H100's.

`triton.compile` needs triton's compiling `@jit`, which TRITON_INTERPRET=1 replaces, so the compiles run in a
child process (this file run as a script) with the interpreter off; the tests judge its JSON report.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

SM90 = ("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # 227 KiB of shared memory a block may opt into on sm_90
K2_LATENT, K2_ROPE, K2_NOPE, K2_V = 512, 64, 128, 128
DTYPES = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # pointer type -> the launcher's dot precision
# (dtype, heads, page): K2's 64 heads on one rank (16 per program) and an 8-rank shard's 8 (two queries per
# program), the default page of 16 tokens and a larger one; 16 and 32 heads compile to the 64-head kernel.
CASES = [("bf16", 64, 16), ("bf16", 8, 16), ("bf16", 64, 64), ("fp16", 64, 16), ("fp32", 64, 16)]
POINTERS = ["q_lat_ptr", "q_rope_ptr", "cache_ptr", "out_ptr"]
INDEXES = ["table_ptr", "work_ptr", "seq_ptr"]
SCALARS = ["heads", "stride_qlt", "stride_qlh", "stride_qrt", "stride_qrh", "stride_cache", "stride_table",
           "stride_ot", "stride_oh"]
EXPANDED_SCALARS = ["n", "start", "j0", "kt", "stride_qnt", "stride_qnh", "stride_qrt", "stride_qrh", "stride_knh",
                    "stride_knk", "stride_kr", "stride_vh", "stride_vk"]


def _compile_kernel(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                    num_stages: int) -> dict[str, Any]:
    """{'error': '' or the compiler's complaint, 'shared': bytes of shared memory}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget(*SM90),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # the report carries any compiler failure to the test
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], "shared": 0}
    return {"error": "", "shared": compiled.metadata.shared}


def _compile(dtype: str, heads: int, page: int, block_n: int | None = None) -> dict[str, Any]:
    """The absorbed kernel with the tiles the launcher picks for these heads (block_n overridden for the
    control)."""
    from k2serve.worker.kernels.mla_kernel import paged_mla_absorbed_kernel
    from k2serve.worker.kernels.triton_mla import MLATiles

    tiles = MLATiles.for_shape(heads, K2_LATENT)
    constexprs = {
        "LATENT": K2_LATENT, "ROPE": K2_ROPE, "PAGE": page, "BLOCK_Q": tiles.block_q, "BLOCK_H": tiles.block_h,
        "BLOCK_N": block_n or tiles.block_n, "BLOCK_C": K2_LATENT, "BLOCK_R": K2_ROPE, "DOT_PRECISION": DTYPES[dtype],
    }
    signature = {
        **dict.fromkeys(POINTERS, f"*{dtype}"), **dict.fromkeys(INDEXES, "*i32"), **dict.fromkeys(SCALARS, "i32"),
        "sm_scale": "fp32",
    }
    return _compile_kernel(paged_mla_absorbed_kernel, signature, constexprs, tiles.num_warps, tiles.num_stages)


def _compile_expanded(dtype: str) -> dict[str, Any]:
    """The multi-head form's kernel at K2's 64 heads, nope 128, r 64, v 128, with the launcher's tiles."""
    import torch

    from k2serve.worker.kernels.mla_kernel import mla_expanded_tile_kernel
    from k2serve.worker.kernels.triton_mla import ExpandedTiles

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tiles = ExpandedTiles.for_shape(64, K2_NOPE, K2_V, torch_dtype)
    constexprs = {
        "NOPE": K2_NOPE, "ROPE": K2_ROPE, "V_DIM": K2_V, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
        "BLOCK_NOPE": K2_NOPE, "BLOCK_R": K2_ROPE, "BLOCK_V": K2_V, "DOT_PRECISION": DTYPES[dtype],
    }
    signature = {
        **dict.fromkeys(["q_nope_ptr", "q_rope_ptr", "k_nope_ptr", "k_rope_ptr", "v_ptr"], f"*{dtype}"),
        **dict.fromkeys(["m_ptr", "l_ptr", "acc_ptr"], "*fp32"), **dict.fromkeys(EXPANDED_SCALARS, "i32"),
        "sm_scale": "fp32",
    }
    return _compile_kernel(mla_expanded_tile_kernel, signature, constexprs, tiles.num_warps, tiles.num_stages)


def _child() -> dict[str, Any]:
    report = {"|".join(map(str, case)): _compile(*case) for case in CASES}
    report |= {f"expanded|{dtype}": _compile_expanded(dtype) for dtype in ("bf16", "fp32")}
    report["control_block_n_8"] = _compile("bf16", 64, 64, block_n=8)  # a dot of 8 columns: sm_90 refuses it
    return report


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    from helpers.child import run_script_report  # not at the top: this file also runs as a plain script

    return run_script_report(__file__, interpret=False, timeout_s=600)


@pytest.mark.parametrize("case", ["|".join(map(str, case)) for case in CASES])
def test_kernel_compiles_for_sm90_at_k2_dims(report: dict[str, Any], case: str) -> None:
    assert report[case]["error"] == "", report[case]["error"]
    assert 0 < report[case]["shared"] <= H100_SHARED_BYTES, report[case]["shared"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_multi_head_form_compiles_for_sm90_at_k2_dims(report: dict[str, Any], dtype: str) -> None:
    case = report[f"expanded|{dtype}"]
    assert case["error"] == "", case["error"]
    assert 0 < case["shared"] <= H100_SHARED_BYTES, case["shared"]


def test_compile_rejects_an_illegal_tile(report: dict[str, Any]) -> None:
    assert report["control_block_n_8"]["error"] != ""


if __name__ == "__main__":
    print(json.dumps(_child()))
