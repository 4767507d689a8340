"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) over the paged latent cache.

Attention runs in the *absorbed* form: the up-projection kv_b_proj is split into W_UK [H, nope, c] and
W_UV [H, v, c]; queries are mapped into the latent space (q·W_UK) and attend to the cached latents directly,
and the attended latent is mapped out through W_UV. Full per-head keys and values are never built, so a step
costs O(context × kv_lora_rank) per head instead of expanding the whole context every time. Long prefill chunks
take the multi-head form where it pays (`_decompress_pays`), expanding each key tile once.

CUDA tensors run both forms as Triton kernels (`k2serve.worker.kernels.triton_mla`); the CPU runs torch tiles
(`attention_tiles`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2serve.worker.model.attention_tiles import (
    TILE_BYTES,
    KeyReader,
    Tiles,
    attend_absorbed,
    attend_decompressed,
)
from k2serve.worker.model.batch import ForwardBatch, LatentKVCache
from k2serve.k2format.model_config import K2Config
from k2serve.worker.model.linear import Projection, Projections
from k2serve.worker.model.norm import rms_norm
from k2serve.worker.model.rope import Rotary, softmax_scale


def use_paged_kernel(device: torch.device) -> bool:
    """CUDA tensors attend through the Triton kernel; the CPU keeps the torch tiles."""
    return device.type == "cuda"


class MLAttention:
    def __init__(self, config: K2Config, layer: int, w: dict[str, torch.Tensor], proj: Projections,
                 deterministic: bool) -> None:
        p = f"model.layers.{layer}.self_attn."
        self.layer = layer
        self.heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.eps = config.rms_norm_eps
        self.scale = softmax_scale(config)
        self.det = deterministic
        if config.q_lora_rank is None:
            self.q_proj: Projection | None = proj.get(p + "q_proj.weight")
        else:
            self.q_proj = None
            self.q_a = proj.get(p + "q_a_proj.weight")
            self.q_a_norm = w[p + "q_a_layernorm.weight"]
            self.q_b = proj.get(p + "q_b_proj.weight")
        self.kv_a = proj.get(p + "kv_a_proj_with_mqa.weight")  # [c + r, D]
        self.kv_a_norm = w[p + "kv_a_layernorm.weight"]
        # Views of the checkpoint's kv_b (one copy of it): each head's slab is row-major, so the batched products
        # take them (or their transposes) as they are.
        kv_b = w[p + "kv_b_proj.weight"].view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_uk = kv_b[:, : self.nope]  # [H, nope, c]
        self.w_uv = kv_b[:, self.nope :]  # [H, v, c]
        self.w_uv_t = self.w_uv.transpose(1, 2)  # [H, c, v]: the batched product's right operand
        self.w_uk_t = self.w_uk.transpose(1, 2)  # [H, c, nope]: expands latents into keys
        self.tiles = Tiles.for_heads(self.heads)
        self.o_proj = proj.get(p + "o_proj.weight")  # [D, H * v]

    def __call__(
        self, x: torch.Tensor, batch: ForwardBatch, kv: LatentKVCache, cos: torch.Tensor, sin: torch.Tensor,
        rotary: Rotary,
    ) -> torch.Tensor:
        """x [T, D] (normed hidden states of every new token) -> [T, D]."""
        T = x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x, self.det)
        else:
            q = self.q_b(rms_norm(self.q_a(x, self.det), self.q_a_norm, self.eps), self.det)
        q = q.view(T, self.heads, self.nope + self.rope_dim)  # [T, H, nope + r]
        q_nope, q_rope = q[..., : self.nope], rotary.apply(q[..., self.nope :], cos, sin)
        # Queries in latent space: [T, H, c].
        q_lat = self._per_head("thn,hnc->thc", q_nope, self.w_uk)  # [T, H, c]

        ckv = self.kv_a(x, self.det)  # [T, c + r]
        latent = rms_norm(ckv[:, : self.kv_lora_rank], self.kv_a_norm, self.eps)  # [T, c]
        k_rope = rotary.apply(ckv[:, self.kv_lora_rank :], cos, sin)  # [T, r]
        kv.write(self.layer, batch.write_slots, latent, k_rope)

        if use_paged_kernel(x.device):
            out, direct = self._attend_paged(q_lat, q_nope, q_rope, batch, kv)
        else:
            out, direct = self._attend_tiles(x, q_lat, q_nope, q_rope, batch, kv)
        o = self._per_head("thc,hvc->thv", out, self.w_uv, self.w_uv_t)  # [T, H, v]
        for rows, o_rows in direct:
            o[rows] = o_rows
        o = o.reshape(T, self.heads * self.v_dim)
        return self.o_proj(o, self.det)

    def _attend_paged(self, q_lat: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor, batch: ForwardBatch,
                      kv: LatentKVCache) -> tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]:
        """The Triton kernels: chunks where the multi-head form pays, one by one in it; every other sequence of
        the step in one absorbed launch (batch-invariant: deterministic mode sends every sequence there, as the
        form must not depend on how a prompt was chunked) -> as `_attend_tiles`."""
        from k2serve.worker.kernels.triton_mla import (  # triton only where it runs
            ExpandedTiles, MLATiles, mla_expanded, paged_mla_absorbed,
        )

        expanded = frozenset() if self.det else \
            frozenset(i for i, s in enumerate(batch.seqs) if self._decompress_pays(s.num_new))
        tiles = MLATiles.for_shape(self.heads, self.kv_lora_rank)
        plan = batch.paged_plan(kv.block_size, tiles.block_q, q_lat.device, expanded)
        out = paged_mla_absorbed(q_lat, q_rope, kv.data[self.layer], plan, self.scale, tiles)  # [T, H, c]
        direct: list[tuple[slice, torch.Tensor]] = []
        for i in sorted(expanded):
            s = batch.seqs[i]
            rows = slice(s.row, s.row + s.num_new)
            out[rows] = 0  # their W_UV product is replaced by `direct`
            slots = s.slots.to(q_lat.device)  # once, not per key tile
            o_rows = mla_expanded(q_nope[rows], q_rope[rows], self._reader(kv, slots), s.start_pos,
                                  self.kv_lora_rank, self.w_uk_t, self.w_uv_t, self.scale,
                                  ExpandedTiles.for_shape(self.heads, self.nope, self.v_dim, q_lat.dtype))  # [n, H, v]
            direct.append((rows, o_rows.to(q_lat.dtype)))
        return out, direct

    def _attend_tiles(self, x: torch.Tensor, q_lat: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor,
                      batch: ForwardBatch, kv: LatentKVCache) -> tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]:
        """The torch path (CPU): decodes gathered in chunks, prefill chunks in one product or in tiles, or query
        by query in deterministic mode -> attended latents [T, H, c], and the rows whose attention came out per
        head [n, H, v] (the decompressed form) with their slices."""
        T = x.shape[0]
        out = x.new_empty(T, self.heads, self.kv_lora_rank)  # [T, H, c]
        # Latent and rope parts in one product against the whole cached rows (no strided copies of either).
        q_all = None if self.det else torch.cat([q_lat, q_rope], dim=-1)  # [T, H, c + r]
        gather = None if self.det else batch.decode_gather(kv)
        keys_width = kv.data.shape[-1]
        direct: list[tuple[slice, torch.Tensor]] = []  # rows whose attention came out per head [n, H, v]
        if gather is not None and q_all is not None:
            for chunk in gather.chunks:
                keys = kv.gather_blocks(self.layer, chunk.blocks)  # [b, L, c + r]
                scores = torch.baddbmm(chunk.bias, q_all.index_select(0, chunk.rows), keys.transpose(1, 2),
                                       alpha=self.scale)  # [b, H, L]
                probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(keys.dtype)
                out.index_copy_(0, chunk.rows, torch.bmm(probs, keys[..., : self.kv_lora_rank]))  # [b, H, c]
        for s in batch.seqs:
            if gather is not None and id(s) in gather.seq_ids:
                continue
            if q_all is not None:  # a prefill chunk (or a lone decode)
                rows = slice(s.row, s.row + s.num_new)
                if s.context_len * max(s.num_new * self.heads, keys_width) * 4 <= TILE_BYTES:  # small: one product
                    keys = kv.rows(self.layer, s.slots[: s.context_len])  # [ctx, c + r]
                    out[rows] = self._attend_causal(q_all[rows], keys, s.start_pos)
                    continue
                read = self._reader(kv, s.slots)
                if self._decompress_pays(s.num_new):
                    out[rows] = 0
                    o_rows = attend_decompressed(q_nope[rows], q_rope[rows], read, s.start_pos, self.kv_lora_rank,
                                                 self.w_uk_t, self.w_uv_t, self.scale, self.tiles)  # [n, H, v]
                    direct.append((rows, o_rows.to(x.dtype)))
                else:
                    out[rows] = attend_absorbed(q_all[rows], read, s.start_pos, self.kv_lora_rank, self.scale,
                                                self.tiles).to(x.dtype)
                continue
            c_all, r_all = kv.read(self.layer, s.slots[: s.context_len])  # [ctx, c], [ctx, r]
            for i in range(s.num_new):
                n = s.start_pos + i + 1  # the keys this query sees, exactly: prefill and decode alike
                out[s.row + i] = self._attend(q_lat[s.row + i : s.row + i + 1], q_rope[s.row + i : s.row + i + 1],
                                              c_all[:n], r_all[:n])[0]
        return out, direct

    def _per_head(self, equation: str, x: torch.Tensor, w: torch.Tensor, w_bmm: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """A per-head projection of every row, x [T, H, a] -> [T, H, b] (`equation` over w); one batched product
        over the heads (w_bmm [H, a, b]: w itself when that is its layout), or row by row in deterministic mode
        (see `Projection`). The batched product is half einsum's cost at decode sizes (8 vs 16 µs)."""
        if self.det and x.shape[0]:
            return torch.cat([torch.einsum(equation, x[t : t + 1], w) for t in range(x.shape[0])])
        return torch.bmm(x.transpose(0, 1), w if w_bmm is None else w_bmm).transpose(0, 1)

    def _reader(self, kv: LatentKVCache, slots: torch.Tensor) -> KeyReader:
        return lambda a, b: kv.rows(self.layer, slots[a:b])

    def _decompress_pays(self, n: int) -> bool:
        """Multi-head form for a chunk of n queries when it at least halves the products per query and key,
        H·(nope + r + v) against the absorbed H·(2c + r) (K2: 320 vs 1088), and that saving outweighs expanding
        each key once, H·(nope + v)·c (K2: from ~171 queries on). Where it saves less, the two forms' equal
        softmax work dominates and the absorbed form's one shared-key product is faster (tiny-k2, 144 vs 80:
        bench/RESULTS.md)."""
        c, absorbed, expanded = self.kv_lora_rank, 2 * self.kv_lora_rank + self.rope_dim, \
            self.nope + self.rope_dim + self.v_dim
        return absorbed >= 2 * expanded and n * (absorbed - expanded) > (self.nope + self.v_dim) * c

    def _attend_causal(self, q: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
        """q [n, H, c + r] at positions start.., keys [ctx, c + r] -> attended latents [n, H, c], each query seeing
        the keys up to its own position. Every head's queries as rows of one product (the keys are shared)."""
        n, ctx = q.shape[0], keys.shape[0]
        scores = torch.mm(q.reshape(n * self.heads, -1), keys.t()).view(n, self.heads, ctx).mul_(self.scale)
        future = torch.ones(n, ctx, dtype=torch.bool, device=q.device).triu_(start + 1)  # [n, ctx]
        scores.masked_fill_(future.unsqueeze(1), float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(keys.dtype)  # [n, H, ctx]
        return torch.mm(probs.view(n * self.heads, ctx), keys[:, : self.kv_lora_rank]).view(n, self.heads, -1)

    def _attend(self, q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Deterministic mode, one query: q_lat [1, H, c], q_rope [1, H, r], the keys it sees c [n, c] / r [n, r]
        -> attended latent [1, H, c]."""
        scores = (torch.einsum("nhc,kc->nhk", q_lat, c) + torch.einsum("nhr,kr->nhk", q_rope, r)) * self.scale
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)  # [n, H, ctx]
        return torch.einsum("nhk,kc->nhc", probs, c)
