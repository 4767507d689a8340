"""Triton kernels of MLA attention (launched by `triton_mla`), both with an fp32 online softmax (running max m,
denominator l, numerator acc) and no inline assembly, so `TRITON_INTERPRET=1` runs the same code.

`paged_mla_absorbed_kernel`: one program owns BLOCK_Q queries of one sequence × BLOCK_H heads: BLOCK_Q * BLOCK_H
score rows that share every key, since in the absorbed form a query's heads all attend to the same cached rows
[c | r]. It walks the keys 0 .. its last query's position in BLOCK_N tiles, in order, looking each tile's rows up
through the sequence's block table (no gathered copy of the context); acc is the attended latent [rows, c].

`mla_expanded_tile_kernel`: the multi-head form, one key tile already expanded into per-head keys and values;
each program folds it into the softmax state of BLOCK_M queries of one head, carried in memory across tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_mla_absorbed_kernel(
    q_lat_ptr,  # [T, H, c] queries in latent space (q_nope · W_UK)
    q_rope_ptr,  # [T, H, r] rotated rope parts of the queries
    cache_ptr,  # [slots, c + r] one layer of the latent cache: latent, then rope key
    table_ptr,  # [S, nb] int32 block table of each sequence
    work_ptr,  # [P, 2] int32 (sequence, first query in it) of each program
    seq_ptr,  # [S, 3] int32 (first row in the flattened batch, position of the first new token, new tokens)
    out_ptr,  # [T, H, c] attended latents
    heads,
    sm_scale,
    stride_qlt,
    stride_qlh,
    stride_qrt,
    stride_qrh,
    stride_cache,
    stride_table,
    stride_ot,
    stride_oh,
    LATENT: tl.constexpr,  # c
    ROPE: tl.constexpr,  # r
    PAGE: tl.constexpr,  # cache block size: slot = block * PAGE + offset
    BLOCK_Q: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # c rounded up to a power of two
    BLOCK_R: tl.constexpr,  # r rounded up to a power of two
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = tl.load(work_ptr + pid * 2)
    q0 = tl.load(work_ptr + pid * 2 + 1)
    row0 = tl.load(seq_ptr + seq * 3)
    start = tl.load(seq_ptr + seq * 3 + 1)
    n_new = tl.load(seq_ptr + seq * 3 + 2)

    offs_m = tl.arange(0, BLOCK_Q * BLOCK_H)  # score rows: query-major, heads inside
    qi = q0 + offs_m // BLOCK_H  # [M] query index within the sequence's chunk
    head = tl.program_id(1) * BLOCK_H + offs_m % BLOCK_H  # [M]
    row_ok = (qi < n_new) & (head < heads)
    pos = start + qi  # [M] position of each row's query: it sees keys 0..pos
    t = (row0 + qi).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < LATENT
    r_ok = offs_r < ROPE
    q_lat = tl.load(q_lat_ptr + t[:, None] * stride_qlt + head[:, None] * stride_qlh + offs_c[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # [M, BC]
    q_rope = tl.load(q_rope_ptr + t[:, None] * stride_qrt + head[:, None] * stride_qrh + offs_r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [M, BR]

    # Keys past the program's last query are never read; key 0 is visible to every row, so the first tile gives
    # each row a finite max and no row ever computes exp2(-inf - -inf).
    k_end = start + tl.minimum(q0 + BLOCK_Q, n_new)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 in place of exp
    m_i = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_C], tl.float32)
    table = table_ptr + seq.to(tl.int64) * stride_table
    for n0 in range(0, k_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)  # [N] key positions
        j_ok = j < k_end
        block = tl.load(table + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        rows = cache_ptr + (block * PAGE + j % PAGE)[:, None] * stride_cache  # [N, 1]
        k_lat = tl.load(rows + offs_c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)  # [N, BC]
        k_rope = tl.load(rows + LATENT + offs_r[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0)  # [N, BR]
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=DOT_PRECISION)  # [M, N]
        s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION)
        visible = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])  # [M, N]
        alpha = tl.math.exp2(m_i - m_new)  # [M]: 0 on the first tile, exactly 1 on a wholly masked one
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(k_lat.dtype), k_lat, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def mla_expanded_tile_kernel(
    q_nope_ptr,  # [n, H, nope] the chunk's queries
    q_rope_ptr,  # [n, H, r]
    k_nope_ptr,  # [H, kt, nope] keys of one key tile, expanded from its latents (latent · W_UK)
    k_rope_ptr,  # [kt, r] the tile's rope keys, shared by the heads
    v_ptr,  # [H, kt, v] values of the tile (latent · W_UV)
    m_ptr,  # [H, n] fp32 running max of each (head, query), carried from tile to tile
    l_ptr,  # [H, n] fp32 running denominator
    acc_ptr,  # [H, n, v] fp32 running numerator
    n,
    start,  # position of the chunk's first query
    j0,  # position of the tile's first key
    kt,
    sm_scale,
    stride_qnt,
    stride_qnh,
    stride_qrt,
    stride_qrh,
    stride_knh,
    stride_knk,
    stride_kr,
    stride_vh,
    stride_vk,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Multi-head form: one program updates the softmax state of BLOCK_M queries of one head with one key tile."""
    head = tl.program_id(1).to(tl.int64)
    qi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    q_ok = qi < n
    pos = start + qi
    qi = qi.to(tl.int64)  # offsets of long chunks pass 2**31 elements
    offs_d = tl.arange(0, BLOCK_NOPE)
    offs_r = tl.arange(0, BLOCK_R)
    offs_v = tl.arange(0, BLOCK_V)
    d_ok = offs_d < NOPE
    r_ok = offs_r < ROPE
    v_ok = offs_v < V_DIM
    q_nope = tl.load(q_nope_ptr + qi[:, None] * stride_qnt + head * stride_qnh + offs_d[None, :],
                     mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [M, BD]
    q_rope = tl.load(q_rope_ptr + qi[:, None] * stride_qrt + head * stride_qrh + offs_r[None, :],
                     mask=q_ok[:, None] & r_ok[None, :], other=0.0)  # [M, BR]
    state = head * n + qi  # [M] index into m and l
    m_i = tl.load(m_ptr + state, mask=q_ok, other=0.0)
    l_i = tl.load(l_ptr + state, mask=q_ok, other=0.0)
    acc_ptrs = acc_ptr + state[:, None] * V_DIM + offs_v[None, :]
    acc = tl.load(acc_ptrs, mask=q_ok[:, None] & v_ok[None, :], other=0.0)  # [M, BV]

    # Keys past this program's last query are never read. The tile at key 0 holds a key every row sees, so each
    # row's max is finite from the first tile on and no row computes exp2(-inf - -inf).
    k_end = tl.minimum(kt, start + tl.minimum(n, (tl.program_id(0) + 1) * BLOCK_M) - j0)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 in place of exp
    for k0 in range(0, k_end, BLOCK_N):
        k = k0 + tl.arange(0, BLOCK_N)  # [N] keys within the tile
        k_ok = k < k_end
        k_nope = tl.load(k_nope_ptr + head * stride_knh + k[:, None] * stride_knk + offs_d[None, :],
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [N, BD]
        k_rope = tl.load(k_rope_ptr + k[:, None] * stride_kr + offs_r[None, :],
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [N, BR]
        v = tl.load(v_ptr + head * stride_vh + k[:, None] * stride_vk + offs_v[None, :],
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)  # [N, BV]
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision=DOT_PRECISION)  # [M, N]
        s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION)
        visible = (j0 + k[None, :] <= pos[:, None]) & k_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    tl.store(m_ptr + state, m_i, mask=q_ok)
    tl.store(l_ptr + state, l_i, mask=q_ok)
    tl.store(acc_ptrs, acc, mask=q_ok[:, None] & v_ok[None, :])
