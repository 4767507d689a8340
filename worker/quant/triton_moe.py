"""Triton INT4 W4A16 group-32 fused MoE for one expert shard — the CUDA backend `select_moe_backend` returns.

Pipeline (all on the device, no host synchronisation, so a decode step can be captured in a CUDA graph):
1. `align_slots`: sort the T*k token slots by local expert and pad each expert's run to BLOCK_M; slots of
   experts this shard does not own are left out, and blocks past the last run carry expert -1 and exit at once.
2. gate_up grouped GEMM on the packed w13 words with SiLU(gate) * up fused into its epilogue.
3. down grouped GEMM on w2, scaled by the slot's routing weight, into an fp32 per-slot buffer [T, k, H].
4. combine: slots summed in order 0..k-1 (or the per-slot buffer itself when combine=False).

Determinism: every output element is one program's fixed-order K loop (no split-K, no atomics) and the combine
order is fixed, so results depend only on the tile config; deterministic=True pins the config to the
batch-independent one (`lookup_config(..., None)`), making each row independent of which rows share the call.
Dense shards (no scales) run `reference_moe` (dequantize-free torch on the same device): K2's routed experts
are always INT4, dense experts only appear in small bf16 test models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from k2serve.worker.quant.int4 import GROUP_SIZE
from k2serve.worker.quant.moe import ExpertShard, reference_moe
from k2serve.worker.quant.triton_config import MoEConfig, lookup_config, shape_key
from k2serve.worker.quant.triton_kernels import combine_slots_kernel, int4_moe_gemm_kernel

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMBINE_BLOCK_H = 1024


@dataclass
class AlignedSlots:
    """Token slots grouped by local expert, each expert's run padded to block_m."""

    sorted_slots: torch.Tensor  # [num_blocks * block_m] int32 slot ids (t * k + s); num_slots marks padding
    block_expert: torch.Tensor  # [num_blocks] int32 local expert of each block, -1 past the last run
    block_m: int


def align_slots(topk_ids: torch.Tensor, start: int, num_local: int, block_m: int) -> AlignedSlots:
    """topk_ids [T, k] global ids -> slots sorted by local expert, runs padded to block_m. The buffer sizes
    depend only on (T*k, num_local, block_m), never on the routing, so nothing waits for the device."""
    num_slots = topk_ids.numel()
    device = topk_ids.device
    local = topk_ids.reshape(-1) - start  # [S]
    owned = (local >= 0) & (local < num_local)
    key = torch.where(owned, local, num_local)  # [S]: non-owned slots sort after every expert
    counts = torch.bincount(key, minlength=num_local + 1)[:num_local]  # [E_l]
    padded = (counts + block_m - 1) // block_m * block_m  # [E_l]
    run_end = torch.cumsum(padded, 0)  # [E_l]
    run_start = run_end - padded
    slot_start = torch.cumsum(counts, 0) - counts  # [E_l] first position of each expert among sorted slots

    order = torch.argsort(key, stable=True)  # [S] slot ids, grouped by expert, slot order kept inside a group
    sorted_key = key[order]
    sorted_owned = sorted_key < num_local
    expert_of = torch.where(sorted_owned, sorted_key, 0)
    rank = torch.arange(num_slots, device=device) - slot_start[expert_of]  # [S] position inside its run
    # Each expert with tokens adds at most one partly filled block: blocks <= ceil(S / block_m) + min(E_l, S).
    num_blocks = triton.cdiv(num_slots, block_m) + min(num_local, num_slots)
    capacity = num_blocks * block_m
    # Non-owned slots are scattered into one spare entry past the end and dropped with it.
    dest = torch.where(sorted_owned, run_start[expert_of] + rank, capacity)  # [S]
    sorted_slots = torch.full((capacity + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)
    block_first = torch.arange(num_blocks, device=device) * block_m  # [num_blocks]
    block_expert = torch.searchsorted(run_end, block_first, right=True)  # [num_blocks] in [0, E_l]
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return AlignedSlots(sorted_slots[:capacity], block_expert, block_m)


def _check_inputs(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, shard: ExpertShard) -> None:
    if x.dim() != 2 or x.shape[1] != shard.hidden_size:
        raise ValueError(f"x must be [T, {shard.hidden_size}], got {tuple(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_ACT_DTYPES}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids must be int64 [{x.shape[0]}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")
    if shard.w2_scale is None:
        raise ValueError("shard has w13_scale but no w2_scale: a quantized shard needs both")
    if shard.w13.dtype != torch.int32 or shard.w2.dtype != torch.int32:
        raise ValueError(f"quantized shard weights must be packed int32, got {shard.w13.dtype} / {shard.w2.dtype}")
    hidden, inter = shard.hidden_size, shard.intermediate_size
    if hidden % GROUP_SIZE or inter % GROUP_SIZE:
        raise ValueError(f"hidden {hidden} and intermediate {inter} must be multiples of {GROUP_SIZE}")
    devices = {t.device for t in (x, topk_ids, topk_weights, shard.w13, shard.w2, shard.w13_scale, shard.w2_scale)}
    if len(devices) != 1:
        raise ValueError(f"inputs and shard live on different devices: {sorted(map(str, devices))}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _launch_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    aligned: AlignedSlots,
    routing: torch.Tensor,
    *,
    n: int,
    a_row_div: int,
    gated: bool,
    cfg: MoEConfig,
    phase: str,
) -> None:
    tiles = getattr(cfg, phase)
    k = a.shape[1]
    grid = (aligned.block_expert.numel(), triton.cdiv(n, tiles.block_n))
    int4_moe_gemm_kernel[grid](
        a, w, scale, out, aligned.sorted_slots, aligned.block_expert, routing,
        out.shape[0], n, k,
        a.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        A_ROW_DIV=a_row_div,
        GATED=gated,
        MUL_ROUTING=not gated,
        # fp32 activations keep full fp32 products on the GPU too (no silent TF32).
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=aligned.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shard: ExpertShard,
    *,
    deterministic: bool = False,
    combine: bool = True,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """The MoE backend contract of `moe.py` on INT4 shards. `config` overrides the JSON lookup (tuning, tests)."""
    if not shard.quantized:
        return reference_moe(x, topk_ids, topk_weights, shard, deterministic=deterministic, combine=combine)
    _check_inputs(x, topk_ids, topk_weights, shard)
    assert shard.w13_scale is not None and shard.w2_scale is not None
    T, k = topk_ids.shape
    hidden, inter = shard.hidden_size, shard.intermediate_size
    if config is None:
        shape = shape_key(shard.num_local, hidden, inter, k)
        config = lookup_config(device_name(x.device), shape, None if deterministic else T)
    slots = torch.zeros(T, k, hidden, dtype=torch.float32, device=x.device)  # [T, k, H]: non-owned slots stay 0
    if T == 0:
        return slots.sum(1).to(x.dtype) if combine else slots.to(x.dtype)

    x = x.contiguous()
    aligned = align_slots(topk_ids, shard.start, shard.num_local, config.block_m)
    routing = topk_weights.reshape(-1).float().contiguous()  # [T*k]
    act = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)  # [T*k, I] silu(gate) * up per slot
    w13, s13 = shard.w13.contiguous(), shard.w13_scale.contiguous()
    w2, s2 = shard.w2.contiguous(), shard.w2_scale.contiguous()
    _launch_gemm(x, w13, s13, act, aligned, routing, n=inter, a_row_div=k, gated=True, cfg=config, phase="gate_up")
    slot_rows = slots.view(T * k, hidden)  # [T*k, H]
    _launch_gemm(act, w2, s2, slot_rows, aligned, routing, n=hidden, a_row_div=1, gated=False, cfg=config, phase="down")
    if not combine:
        return slots.to(x.dtype)
    out = torch.empty(T, hidden, dtype=x.dtype, device=x.device)  # [T, H]
    grid = (T, triton.cdiv(hidden, COMBINE_BLOCK_H))
    combine_slots_kernel[grid](slots, out, hidden, TOP_K=k, BLOCK_H=COMBINE_BLOCK_H)
    return out
