"""Absorbed MLA attention over the paged latent cache on the GPU: the launcher of `mla_kernel`.

The kernel covers decode and prefill chunks alike (queries at positions start..start+n-1 of each sequence, causal),
every sequence of a step in one launch, keys read through the block tables. Its memory is one tile per program:
BLOCK_Q * BLOCK_H score rows × BLOCK_N keys and an fp32 accumulator [rows, c].

Batch invariance (deterministic mode relies on it): a row's result is one program's walk over key tiles that start
at position 0 and advance by BLOCK_N, in order, with no split of the key axis and no atomics. A tile wholly past
the row's position changes nothing, bit for bit (its max is -inf, so alpha is exactly 1 and p exactly 0), so a
query's result depends only on its own query, its sequence's keys up to its position and the tiles — which
`MLATiles.for_shape` picks from the model's shape alone, never from the batch. The same query therefore gets the
same bits whatever shares the launch and however its prompt was chunked (resume, prefix-cache hits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from k2serve.worker.kernels.mla_kernel import paged_mla_absorbed_kernel
from k2serve.worker.model.batch import PagedPlan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS = 16  # score rows per program: the smallest M a tensor-core dot takes


@dataclass(frozen=True)
class MLATiles:
    block_q: int  # queries of one sequence per program
    block_h: int  # heads per program
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def for_shape(heads: int, latent: int) -> "MLATiles":
        """Up to 16 heads of one query per program (K2's 64 heads per rank: 4 programs share each key tile through
        L2); fewer heads fill the 16 rows with more queries. Key tiles of 32 rows at K2's c = 512 keep a bf16 tile
        at 32 KiB per pipeline stage."""
        block_h = min(ROWS, triton.next_power_of_2(heads))
        return MLATiles(max(1, ROWS // block_h), block_h, 32 if latent >= 256 else 64)


def _check(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, plan: PagedPlan, tiles: MLATiles) -> None:
    if q_lat.dim() != 3 or q_rope.dim() != 3 or q_lat.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"q_lat [T, H, c] and q_rope [T, H, r] disagree: {tuple(q_lat.shape)}, {tuple(q_rope.shape)}")
    if cache.dim() != 2 or cache.shape[1] != q_lat.shape[2] + q_rope.shape[2]:
        raise ValueError(f"cache must be [slots, {q_lat.shape[2] + q_rope.shape[2]}], got {tuple(cache.shape)}")
    if q_lat.dtype not in _DTYPES or {q_rope.dtype, cache.dtype} != {q_lat.dtype}:
        raise ValueError(f"queries and cache must share one of {_DTYPES}: {q_lat.dtype}, {q_rope.dtype}, {cache.dtype}")
    if q_lat.stride(2) != 1 or q_rope.stride(2) != 1 or cache.stride(1) != 1:
        raise ValueError("the last dimension of q_lat, q_rope and cache must be contiguous")
    if plan.block_q != tiles.block_q:
        raise ValueError(f"the plan has {plan.block_q} queries per program, the tiles {tiles.block_q}")
    devices = {t.device for t in (q_lat, q_rope, cache, plan.tables, plan.work, plan.seqs)}
    if len(devices) != 1:
        raise ValueError(f"inputs live on different devices: {sorted(map(str, devices))}")


def paged_mla_absorbed(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, plan: PagedPlan,
                       scale: float, tiles: MLATiles, out: torch.Tensor | None = None) -> torch.Tensor:
    """q_lat [T, H, c], q_rope [T, H, r] (rows of every sequence of `plan`), cache [slots, c + r] (one layer;
    slot = block * plan.page + offset) -> attended latents [T, H, c] in the queries' dtype, each query seeing
    its sequence's keys up to its own position. Rows no sequence of the plan owns are left as they were."""
    _check(q_lat, q_rope, cache, plan, tiles)
    T, heads, latent = q_lat.shape
    if out is None:
        out = torch.empty(T, heads, latent, dtype=q_lat.dtype, device=q_lat.device)
    if plan.work.shape[0] == 0:
        return out
    grid = (plan.work.shape[0], triton.cdiv(heads, tiles.block_h))
    paged_mla_absorbed_kernel[grid](
        q_lat, q_rope, cache, plan.tables, plan.work, plan.seqs, out,
        heads, scale,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(0), plan.tables.stride(0),
        out.stride(0), out.stride(1),
        LATENT=latent,
        ROPE=q_rope.shape[2],
        PAGE=plan.page,
        BLOCK_Q=tiles.block_q,
        BLOCK_H=tiles.block_h,
        BLOCK_N=tiles.block_n,
        BLOCK_C=max(16, triton.next_power_of_2(latent)),
        BLOCK_R=max(16, triton.next_power_of_2(q_rope.shape[2])),
        # fp32 inputs keep full fp32 products on the GPU too (no silent TF32).
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
