"""Tiled MLA attention (online softmax over the paged latent cache) against a plain float64 softmax over the whole
context, on fresh random inputs: odd lengths, tile and block boundaries, a prefix-cache hit mid-block."""

from __future__ import annotations

import pytest
import torch

from k2serve.worker.model.attention_tiles import KeyReader, Tiles, attend_absorbed, attend_decompressed

BLOCK = 16
C, R, NOPE, V = 48, 16, 24, 20  # latent, rope, per-head key and value dims (distinct, so a mixed-up axis fails)


def paged(ctx: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, KeyReader]:
    """A cache holding `ctx` random rows in shuffled blocks -> (the rows in position order [ctx, C + R], a reader
    of key positions through the block table)."""
    nb = -(-ctx // BLOCK) + 3
    data = torch.randn(nb * BLOCK, C + R, generator=gen).to(dtype)  # [slots, C + R]
    table = torch.randperm(nb, generator=gen)[: -(-ctx // BLOCK)]  # [blocks of the sequence]
    slots = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:ctx]  # [ctx]
    return data[slots], lambda a, b: data[slots[a:b]]


def reference_latents(q: torch.Tensor, keys: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """float64: q [n, H, C + R], keys [ctx, C + R] -> [n, H, C]."""
    q, keys = q.double(), keys.double()
    scores = torch.einsum("nhd,kd->nhk", q, keys) * scale  # [n, H, ctx]
    n, ctx = q.shape[0], keys.shape[0]
    future = torch.arange(ctx)[None, :] > (start + torch.arange(n))[:, None]  # [n, ctx]
    scores.masked_fill_(future[:, None, :], float("-inf"))
    return torch.einsum("nhk,kc->nhc", scores.softmax(-1), keys[:, :C])


# (start, new tokens, heads, tiles): mid-block prefix hits, a lone decode, tiles that do not divide the lengths
CASES = [(0, 1, 2, Tiles(64, 16)), (0, 37, 3, Tiles(8, 16)), (21, 50, 2, Tiles(16, 20)), (33, 1, 4, Tiles(64, 16)),
         (130, 67, 2, Tiles(64, 32)), (7, 129, 1, Tiles(32, 17)), (300, 5, 5, Tiles(3, 64))]


@pytest.mark.parametrize("start,n,heads,tiles", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_absorbed_tiles_match_the_full_softmax(start: int, n: int, heads: int, tiles: Tiles, dtype: torch.dtype,
                                               tol: float) -> None:
    gen = torch.Generator().manual_seed(start * 1000 + n * 10 + heads)
    keys, read = paged(start + n, dtype, gen)
    q = torch.randn(n, heads, C + R, generator=gen).to(dtype)
    ours = attend_absorbed(q, read, start, C, 0.15, tiles)
    expected = reference_latents(q, keys, start, 0.15)
    rel = ((ours.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel <= tol, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("start,n,heads,tiles", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_decompressed_tiles_equal_absorbed_attention(start: int, n: int, heads: int, tiles: Tiles,
                                                     dtype: torch.dtype, tol: float) -> None:
    """The multi-head form over expanded keys/values is the same attention as the absorbed form followed by W_UV."""
    gen = torch.Generator().manual_seed(start * 1000 + n * 10 + heads + 1)
    keys, read = paged(start + n, dtype, gen)
    w_uk = torch.randn(heads, NOPE, C, generator=gen) / C**0.5  # [H, nope, c]
    w_uv = torch.randn(heads, V, C, generator=gen) / C**0.5  # [H, v, c]
    q_nope = torch.randn(n, heads, NOPE, generator=gen).to(dtype)
    q_rope = torch.randn(n, heads, R, generator=gen).to(dtype)
    ours = attend_decompressed(q_nope, q_rope, read, start, C, w_uk.transpose(1, 2).to(dtype),
                               w_uv.transpose(1, 2).to(dtype), 0.15, tiles)  # [n, H, v]
    q_lat = torch.einsum("nhd,hdc->nhc", q_nope.double(), w_uk.to(dtype).double())
    latents = reference_latents(torch.cat([q_lat, q_rope.double()], dim=-1), keys, start, 0.15)  # [n, H, c]
    expected = torch.einsum("nhc,hvc->nhv", latents, w_uv.to(dtype).double())
    rel = ((ours.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel <= tol, f"max relative error {rel:.2e}"


def test_tiles_fit_the_budget() -> None:
    tiles = Tiles.for_heads(64, budget=4 << 20)
    assert tiles.queries * 64 * tiles.keys * 4 <= 4 << 20
    assert Tiles.for_heads(1 << 20).keys == 16  # never a degenerate tile


@pytest.mark.parametrize("start", [0, 37])  # a whole prompt, and one continuing mid-block after a prefix
def test_layer_output_does_not_depend_on_the_attention_path(monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    """A tiny-k2 attention layer's output for a chunk, all of it in tiles, equals the one-product path's (fp32).
    (Whole-model logits would also differ where a router's near-tie flips on a last-bit difference.)"""
    from helpers.tiny import tiny_weights

    from k2serve.worker.model import mla
    from k2serve.worker.model.batch import ForwardBatch, LatentKVCache, SeqSlice
    from k2serve.worker.model.k2 import K2Model

    w = tiny_weights()
    model = K2Model(w.config, w.dense, w.experts)
    attn = model.layers[1][1]
    gen = torch.Generator().manual_seed(start)
    x = torch.randn(start + 150, w.config.hidden_size, generator=gen)  # [T, D]
    slots = torch.randperm(16 * 16, generator=gen)[: x.shape[0]]  # [T]: blocks in no particular order

    def outputs() -> torch.Tensor:
        kv = LatentKVCache(w.config, 16, 16, model.dtype, model.device)
        out = []
        for a, b in ((0, start), (start, x.shape[0])):
            if b > a:
                batch = ForwardBatch(torch.zeros(b - a, dtype=torch.int64), torch.arange(a, b),
                                     [SeqSlice(0, b - a, a, slots)], torch.arange(b - a))
                cos, sin = model.rotary.cos_sin(torch.arange(a, b), model.dtype)
                out.append(attn(x[a:b], batch, kv, cos, sin, model.rotary))
        return torch.cat(out)  # [T, D]

    one_product = outputs()
    monkeypatch.setattr(mla, "TILE_BYTES", 0)
    monkeypatch.setattr(attn, "tiles", Tiles(16, 32))
    tiled = outputs()
    rel = ((tiled - one_product).abs().max() / one_product.abs().max()).item()
    assert rel <= 1e-5, f"max relative error {rel:.2e}"
