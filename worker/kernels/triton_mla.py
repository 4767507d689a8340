"""MLA attention over the paged latent cache on the GPU: the launchers of `mla_kernel`, one per form.

`paged_mla_absorbed`: decode and prefill chunks alike (queries at positions start..start+n-1 of each sequence,
causal), every sequence of a step in one launch, keys read through the block tables. Its memory is one tile per
program: BLOCK_Q * BLOCK_H score rows × BLOCK_N keys and an fp32 accumulator [rows, c].

`mla_expanded`: the multi-head form of one long prefill chunk (`MLAttention._decompress_pays`: K2 does 320
instead of 1088 products per query, key and head): each key tile's latents are expanded once into per-head keys
and values, and one launch folds the tile into every query's softmax state.

Batch invariance (deterministic mode relies on it, and takes the absorbed form only): a row's result is one
program's walk over key tiles that start at position 0 and advance by BLOCK_N, in order, with no split of the key
axis and no atomics. A tile wholly past the row's position changes nothing, bit for bit (its max is -inf, so alpha
is exactly 1 and p exactly 0), so a query's result depends only on its own query, its sequence's keys up to its
position and the tiles — which `MLATiles.for_shape` picks from the model's shape alone, never from the batch. The
same query therefore gets the same bits whatever shares the launch and however its prompt was chunked (resume,
prefix-cache hits).

Why not a kernel library: FlashInfer's MLA paged attention fits K2's shapes (c 512, r 64), and FlashMLA too (pages
of 64 only), but both are CUDA code that neither runs nor compiles here without a GPU toolchain, so CPU CI could
not check them against the torch reference; and by default their split-KV schedulers size a sequence's key splits
from the whole batch's work, which deterministic mode cannot have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from k2serve.worker.kernels.mla_kernel import mla_expanded_tile_kernel, paged_mla_absorbed_kernel
from k2serve.worker.model.attention_tiles import KeyReader
from k2serve.worker.model.batch import PagedPlan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS = 16  # score rows per program: the smallest M a tensor-core dot takes
EXPAND_BYTES = 64 << 20  # one key tile's expanded keys and values (multi-head form)


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


@dataclass(frozen=True)
class ExpandedTiles:
    block_m: int  # queries of one head per program
    block_n: int  # keys per inner step
    key_tile: int  # keys expanded at once (a multiple of block_n)
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def for_shape(heads: int, nope: int, v_dim: int, dtype: torch.dtype) -> "ExpandedTiles":
        """Key tiles whose expanded keys and values [H, kt, nope + v] fill about EXPAND_BYTES (K2, bf16: 2048
        keys), so a long context costs few launches; fp32 halves the inner step to keep its tiles in shared
        memory."""
        block_n = 32 if dtype == torch.float32 else 64
        per_key = heads * (nope + v_dim) * torch.empty(0, dtype=dtype).element_size()
        return ExpandedTiles(64, block_n, max(block_n, EXPAND_BYTES // per_key // block_n * block_n))


def mla_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, read_keys: KeyReader, start: int, latent: int,
                 w_uk_t: torch.Tensor, w_uv_t: torch.Tensor, scale: float, tiles: ExpandedTiles) -> torch.Tensor:
    """Multi-head form of one sequence's chunk (`attend_decompressed` on the GPU): q_nope [n, H, nope], q_rope
    [n, H, r] of positions start..; `read_keys(a, b)` -> cached rows [b - a, c + r]; w_uk_t [H, c, nope] and
    w_uv_t [H, c, v] -> attention outputs [n, H, v] (float32). Each key tile is read and expanded once (one
    batched product each for keys and values), then one launch folds it into every query's softmax state, so
    memory is the state [H, n, v] plus one expanded tile."""
    n, heads, nope = q_nope.shape
    v_dim = w_uv_t.shape[-1]
    dtype = q_nope.dtype
    if dtype not in _DTYPES or {q_rope.dtype, w_uk_t.dtype, w_uv_t.dtype} != {dtype}:
        raise ValueError(f"queries and weights must share one of {_DTYPES}: {q_nope.dtype}, {q_rope.dtype}, "
                         f"{w_uk_t.dtype}, {w_uv_t.dtype}")
    if q_nope.stride(2) != 1 or q_rope.stride(2) != 1:
        raise ValueError("the last dimension of q_nope and q_rope must be contiguous")
    if tiles.key_tile % tiles.block_n:
        raise ValueError(f"key_tile {tiles.key_tile} must be a multiple of block_n {tiles.block_n}")
    device = q_nope.device
    m = torch.full((heads, n), float("-inf"), device=device)  # [H, n]
    l = torch.zeros(heads, n, device=device)  # [H, n]
    acc = torch.zeros(heads, n, v_dim, device=device)  # [H, n, v]
    for j0 in range(0, start + n, tiles.key_tile):
        rows = read_keys(j0, min(start + n, j0 + tiles.key_tile))  # [kt, c + r]
        if rows.dtype != dtype:
            raise ValueError(f"cache dtype {rows.dtype} differs from the queries' {dtype}")
        latents = rows[:, :latent].expand(heads, -1, -1)  # [H, kt, c]
        k_nope = torch.bmm(latents, w_uk_t)  # [H, kt, nope]
        values = torch.bmm(latents, w_uv_t)  # [H, kt, v]
        k_rope = rows[:, latent:]  # [kt, r]
        grid = (triton.cdiv(n, tiles.block_m), heads)
        mla_expanded_tile_kernel[grid](
            q_nope, q_rope, k_nope, k_rope, values, m, l, acc,
            n, start, j0, rows.shape[0], scale,
            q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
            k_nope.stride(0), k_nope.stride(1), k_rope.stride(0), values.stride(0), values.stride(1),
            NOPE=nope,
            ROPE=q_rope.shape[2],
            V_DIM=v_dim,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_NOPE=max(16, triton.next_power_of_2(nope)),
            BLOCK_R=max(16, triton.next_power_of_2(q_rope.shape[2])),
            BLOCK_V=max(16, triton.next_power_of_2(v_dim)),
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    return (acc / l[..., None]).transpose(0, 1)  # [n, H, v]
