"""Triton kernels of the INT4 W4A16 group-32 fused MoE (launched by `triton_moe`).

The weights stay in K2's compressed-tensors words: int32 [E, N, K/8], element 8g+j of a row in bits 4j..4j+3 of
word g, stored as q + 8; bf16 scales [E, N, K/32]. Each program dequantizes its [BLOCK_K, BLOCK_N] weight tile in
fp32 registers ((nibble - 8) * scale), casts it to the activation dtype and feeds `tl.dot` with an fp32
accumulator. No inline assembly, so `TRITON_INTERPRET=1` runs the same code.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_tile(w_ptrs, s_ptrs, w_mask, s_mask, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr):
    """Packed words [BLOCK_K/8, BLOCK_N] + scales [BLOCK_K/32, BLOCK_N] -> weights [BLOCK_K, BLOCK_N] in `dtype`."""
    words = tl.load(w_ptrs, mask=w_mask, other=0)  # [BK/8, BN] int32
    shifts = tl.arange(0, 8) * 4  # [8]
    # `>>` is arithmetic on int32; the mask keeps only the nibble, so the sign of the word never leaks in.
    nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
    q = tl.reshape(nibbles.to(tl.float32) - 8.0, (BLOCK_K // 32, 32, BLOCK_N))  # [G, 32, BN]
    scale = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)  # [G, BN]
    return tl.reshape(q * scale[:, None, :], (BLOCK_K, BLOCK_N)).to(dtype)


@triton.jit
def int4_moe_gemm_kernel(
    a_ptr,  # [rows, K] activations: tokens (gate_up) or per-slot intermediate (down)
    w_ptr,  # [E, N or 2N, K/8] int32 packed weights
    s_ptr,  # [E, N or 2N, K/32] scales
    out_ptr,  # [num_slots, N]
    sorted_slots_ptr,  # [padded] slot ids grouped by expert, `num_slots` in padding
    block_expert_ptr,  # [num_blocks] local expert of each BLOCK_M run, -1 past the end
    routing_ptr,  # [num_slots] routing weights (read when MUL_ROUTING)
    num_slots,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    A_ROW_DIV: tl.constexpr,  # top_k for gate_up (a row = token = slot // top_k), 1 for down
    GATED: tl.constexpr,  # gate rows [0, N) and up rows [N, 2N): write silu(gate) * up
    MUL_ROUTING: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)  # [BM]
    row_ok = slots < num_slots
    a_rows = tl.where(row_ok, slots // A_ROW_DIV, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_g = tl.arange(0, BLOCK_K // 32)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_w[:, None]  # [BK/8, BN]
    s_ptrs = s_ptr + expert * stride_se + offs_n[None, :] * stride_sn + offs_g[:, None]  # [BK/32, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # K is a multiple of the group size, so a partial last tile holds whole groups.
        k_ok = k0 + offs_k < K
        w_mask = ((k0 // 8 + offs_w) * 8 < K)[:, None] & n_ok[None, :]
        s_mask = ((k0 // 32 + offs_g) * 32 < K)[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = _dequant_tile(w_ptrs + k0 // 8, s_ptrs + k0 // 32, w_mask, s_mask, BLOCK_K, BLOCK_N, a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = _dequant_tile(
                w_ptrs + N * stride_wn + k0 // 8, s_ptrs + N * stride_sn + k0 // 32, w_mask, s_mask,
                BLOCK_K, BLOCK_N, a.dtype,
            )
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTING:
        acc = acc * tl.load(routing_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def combine_slots_kernel(slots_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """slots fp32 [T, TOP_K, H] -> out [T, H], adding slots in order 0..TOP_K-1 (the order `sum_slots` uses), so
    a row's sum never depends on the launch."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    base = slots_ptr + t * TOP_K * H + offs
    acc = tl.load(base, mask=ok, other=0.0)
    for s in tl.static_range(1, TOP_K):
        acc += tl.load(base + s * H, mask=ok, other=0.0)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
