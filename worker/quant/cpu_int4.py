"""The INT4 routed experts on CPU: torch's weight-only int4 GEMM (`aten._weight_int4pack_mm_for_cpu`: bf16
activations, int4 weights with a per-group scale, bf16 out) on expert shards repacked once into its layout.

Why not the torch reference: it dequantizes every hit expert every step, which was most of a decode step on
CPU (bench/RESULTS.md); this kernel reads the 4-bit weights directly, as the Triton kernel does on GPUs, with
the same W4A16 numerics (16-bit activations). Each output row depends only on its own input row — the kernel
splits work over rows and output columns, never over K (tests/worker/test_cpu_int4.py checks it bit for bit:
rows alone vs in a batch, one thread vs two). Deterministic mode still runs the float32 reference on CPU
(`moe.prepare_experts`): rounding activations to bf16 magnifies any last-bit difference upstream into a
visible change of the logits, enough to move a seeded sample.

The int4 GEMM costs the same per row at any batch size; an expert with a prefill's worth of rows
(`DENSE_MIN_ROWS`) is instead dequantized to bf16 for the call and runs one bf16 GEMM (oneDNN on AMX /
AVX512-BF16 amortizes over the rows): ~3x faster per expert at 512 rows, the weights still stored as INT4.

Repacking keeps the experts INT4: the same nibbles in the kernel's order, plus the group scales as bf16
(scale, zero) pairs with zero 0 (symmetric quantization): a group-32 shard holds 11% more bytes than the
checkpoint's words + scales. Shards the kernel cannot take (dense, a group size other than 32) stay as they are and run
through the reference. (Group 32 makes every dim a multiple of 32: the kernel's output-dim multiple of 16 holds.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from k2serve.worker.quant.int4 import GROUP_SIZE, PACK_FACTOR, unpack_int4
from k2serve.worker.quant.moe import CHECKPOINT_LAYOUT, ExpertShard, reference_moe, route_to_experts

LAYOUT = "cpu-int4pack"
_BLOCK_N = 64  # output rows the kernel packs together
# From this many rows on, an expert's rows go through `dequantize_t` + one bf16 GEMM (oneDNN: AMX / AVX512-BF16)
# instead of the int4 GEMM, which costs the same per row at any batch. Measured per expert (w13 + w2, tiny-k2
# shapes, one thread, AMX): 341 vs 330 µs at 128 rows, 665 vs 376 at 256, 1335 vs 433 at 512; 99 vs 247 at 32.
# (vLLM's AWQ makes the same switch, at 256 rows.) Engine closed loop at 32 concurrent, 6 alternating pairs:
# +6.5% tokens/s on one thread (a rank's), none on two (the int4 GEMM splits over both as well).
DENSE_MIN_ROWS = 128
# oneDNN builds a GEMM kernel per distinct shape and caches it: measured ~880 µs per call over ever-new row
# counts vs ~50 µs repeating one. Rows are padded to a multiple of this, so a process meets few shapes.
DENSE_ROW_BUCKET = 128
_INNER_K_TILES = 2  # the CPU kernel ignores the tiling; the op still takes it
# The op's C binding: `torch.ops.aten...` adds a Python dispatch layer (~1 µs) to each of a step's ~128 calls.
_int4_mm = torch._weight_int4pack_mm_for_cpu


def supports(shard: ExpertShard) -> bool:
    """A quantized shard in the checkpoint layout whose shapes the kernel takes."""
    if not shard.quantized or shard.layout != CHECKPOINT_LAYOUT:
        return False
    return all(s.shape[2] * GROUP_SIZE == w.shape[2] * PACK_FACTOR
               for w, s in ((shard.w13, shard.w13_scale), (shard.w2, shard.w2_scale)) if s is not None)


def _repack(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [E, N, K/8] + scale [E, N, K/32] -> uint8 [E, N, K/2] in the kernel's nibble order and bf16
    (scale, zero) [E, K/32, N, 2]."""
    words = torch.stack([
        torch.ops.aten._convert_weight_to_int4pack_for_cpu((unpack_int4(packed[e]).to(torch.int32) + 8).contiguous(),
                                                           _INNER_K_TILES)
        for e in range(packed.shape[0])
    ])  # one expert at a time: the unpacked int32 copy is 8x the packed bytes
    s = scale.to(torch.bfloat16).transpose(1, 2)  # [E, K/32, N]
    return words, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def repack(shard: ExpertShard) -> ExpertShard:
    """The shard in this kernel's layout, or the shard itself when the kernel cannot run it."""
    if not supports(shard):
        return shard
    assert shard.w13_scale is not None and shard.w2_scale is not None  # supports() checked quantized
    w13, s13 = _repack(shard.w13, shard.w13_scale)
    w2, s2 = _repack(shard.w2, shard.w2_scale)
    return dataclasses.replace(shard, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, layout=LAYOUT)


def cpu_int4_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shard: ExpertShard,
    *,
    deterministic: bool = False,
    combine: bool = True,
) -> torch.Tensor:
    """The `MoEBackend` contract (moe.py) on a repacked shard; any other shard goes to the reference (which is
    what deterministic mode gets: `prepare_experts` leaves its shards in the checkpoint layout). An expert with
    `DENSE_MIN_ROWS` rows or more (prefill) is dequantized to bf16 for one GEMM, except in deterministic mode,
    where every row takes the int4 GEMM (its rows do not depend on the batch)."""
    if shard.layout != LAYOUT:
        return reference_moe(x, topk_ids, topk_weights, shard, deterministic=deterministic, combine=combine)
    dense_from = DENSE_MIN_ROWS if not deterministic and _dense_layout(shard) else float("inf")
    w13, s13, w2, s2 = shard.w13, shard.w13_scale, shard.w2, shard.w2_scale
    assert s13 is not None and s2 is not None
    inter = shard.intermediate_size

    def run(xs: torch.Tensor, hit: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # A decode step runs this loop for every hit expert of every layer (16 x 4 on tiny-k2): per-expert work
        # is the two GEMMs and three small ops, nothing else.
        out = []
        for e, rows in zip(hit.tolist(), xs.split(counts)):  # rows bf16 [n, H] of local expert e
            if rows.shape[0] >= dense_from:
                out.append(_dense_expert(rows, w13[e], s13[e], w2[e], s2[e]))
                continue
            gate_up = _int4_mm(rows, w13[e], GROUP_SIZE, s13[e])  # [n, 2I]
            out.append(_int4_mm(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), w2[e], GROUP_SIZE, s2[e]))
        return torch.cat(out)  # [P, H]

    return route_to_experts(x, topk_ids, topk_weights, shard, combine, run, rows_dtype=torch.bfloat16)


def _dense_expert(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor
                  ) -> torch.Tensor:
    """x bf16 [n, H] through one expert's SwiGLU MLP, its weights dequantized to bf16 for the call -> [n, H]."""
    n = x.shape[0]
    x = F.pad(x, (0, 0, 0, -n % DENSE_ROW_BUCKET))  # [n', H]: few distinct shapes (see DENSE_ROW_BUCKET)
    gate, up = (x @ dequantize_t(w13, s13)).chunk(2, dim=-1)  # [n', I] each
    return ((F.silu(gate) * up) @ dequantize_t(w2, s2))[:n]


def _dense_layout(shard: ExpertShard) -> bool:
    """`dequantize_t` reads whole 64-row blocks; the kernel packs a last partial block differently."""
    return shard.w13.shape[1] % _BLOCK_N == 0 and shard.w2.shape[1] % _BLOCK_N == 0


def dequantize_t(words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One repacked expert matrix back to weights: uint8 [N, K/2] + bf16 (scale, zero) [K/32, N, 2] -> W^T
    bf16 [K, N], each weight the checkpoint's dequantized value rounded once to bf16 (as the GPU kernel feeds
    its dot products). The kernel's layout: blocks of 64 output rows, each stored as [K, 32] bytes whose low
    nibble is row j and high nibble row j + 32 of the block, every nibble the 4-bit value + 8."""
    n, k = words.shape[0], words.shape[1] * 2
    blocks = words.reshape(n // _BLOCK_N, k, _BLOCK_N // 2)  # [N/64, K, 32]
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [N/64, K, 64]: the block's rows in order
    q = q.permute(1, 0, 2).reshape(k // GROUP_SIZE, GROUP_SIZE, n)  # [K/32, 32, N]
    # float32: the product of a 4-bit value and a bf16 scale is exact there (and bf16 broadcasts are slow). The
    # zeros of the (scale, zero) pairs are 0 (`_repack`: symmetric quantization), so they are not added.
    w = (q.float() - 8) * scale[:, None, :, 0].float()  # [K/32, 32, N]
    return w.to(torch.bfloat16).reshape(k, n)
