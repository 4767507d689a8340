"""MLA attention over the paged latent cache in tiles, with an online softmax (flash-style): a step's working
memory is bounded by a tile of queries × a tile of keys, never by prompt × context.

Two forms of the same attention, chosen per step by cost:
- absorbed (`attend_absorbed`): queries live in the latent space (q·W_UK, rope part appended) and attend to the
  cached rows [c + r] directly; the result is an attended latent [H, c] per query, mapped out by W_UV afterwards.
  Cheapest for decode and short chunks: nothing is decompressed.
- decompressed (`attend_decompressed`): each key tile's latents are expanded once per step into per-head keys
  [H, nope] and values [H, v] (multi-head attention, as vLLM and SGLang run long prefills); per query-key pair it
  costs H·(nope + r + v) instead of H·(2c + r), at a price of kt·H·(nope + v)·c to expand each tile once.

Both accumulate the softmax numerator and denominator in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KeyReader = Callable[[int, int], torch.Tensor]  # (a, b) -> cached rows [b - a, c + r] of key positions [a, b)

# Bytes of one tile's scores (float32): bounds a step's attention memory. 4 MiB keeps a tile and its keys in a
# core's L2/L3 and is far above the per-tile Python overhead (a few µs).
TILE_BYTES = 4 << 20
QUERY_TILE = 64  # queries per tile (all heads of each)


@dataclass(frozen=True)
class Tiles:
    queries: int
    keys: int

    @staticmethod
    def for_heads(heads: int, budget: int = TILE_BYTES, queries: int = QUERY_TILE) -> "Tiles":
        """Tiles whose float32 scores [queries × heads × keys] fit `budget` bytes."""
        return Tiles(queries, max(16, budget // (4 * queries * heads)))


@dataclass
class _Softmax:
    """Running max m, denominator l and numerator acc of an online softmax over key tiles, for R score rows."""

    m: torch.Tensor  # [R] float32
    l: torch.Tensor  # [R] float32
    acc: torch.Tensor  # [R, v] float32

    @staticmethod
    def empty(rows: int, width: int, device: torch.device) -> "_Softmax":
        return _Softmax(torch.full((rows,), float("-inf"), device=device), torch.zeros(rows, device=device),
                        torch.zeros(rows, width, device=device))

    def update(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores [R, k] float32 (masked keys -inf; every row has seen a finite score by its first tile),
        values [k, v] float32 (shared by the rows) or [R', k, v] with scores viewable as [R', R/R', k]."""
        m = torch.maximum(self.m, scores.amax(dim=-1))  # [R]
        p = torch.exp(scores - m[:, None])  # [R, k]
        alpha = torch.exp(self.m - m)  # [R]: 0 on the first tile (m was -inf)
        self.l.mul_(alpha).add_(p.sum(dim=-1))
        if values.dim() == 2:
            pv = torch.mm(p, values)  # [R, v]
        else:
            pv = torch.bmm(p.view(values.shape[0], -1, p.shape[-1]), values).view(p.shape[0], -1)
        self.acc.mul_(alpha[:, None]).add_(pv)
        self.m = m

    def result(self) -> torch.Tensor:
        return self.acc / self.l[:, None]  # [R, v]


def _causal_mask(q_pos: torch.Tensor, k_start: int, k_end: int) -> torch.Tensor | None:
    """[q, k] True where key position > query position, or None when the whole tile is visible."""
    if k_end - 1 <= int(q_pos[0]):
        return None
    return torch.arange(k_start, k_end, device=q_pos.device)[None, :] > q_pos[:, None]


def attend_absorbed(q: torch.Tensor, read_keys: KeyReader, start: int, latent_dim: int, scale: float,
                    tiles: Tiles) -> torch.Tensor:
    """q [n, H, c + r] (latent + rope parts) of positions start.. start + n - 1; `read_keys(a, b)` -> the cached
    rows [b - a, c + r] of key positions [a, b) -> attended latents [n, H, c] (float32), each query seeing the
    keys up to its own position. Query tiles are the outer loop: one softmax state at a time."""
    n, heads, _ = q.shape
    out = q.new_empty(n, heads, latent_dim, dtype=torch.float32)
    qf = q.float()
    for i0 in range(0, n, tiles.queries):
        i1 = min(n, i0 + tiles.queries)
        q_pos = torch.arange(start + i0, start + i1, device=q.device)  # [qt]
        qt = qf[i0:i1].reshape(-1, qf.shape[-1])  # [qt * H, c + r]: every head of a query shares its keys
        state = _Softmax.empty(qt.shape[0], latent_dim, q.device)
        for j0 in range(0, start + i1, tiles.keys):
            j1 = min(start + i1, j0 + tiles.keys)
            keys = read_keys(j0, j1).float()  # [kt, c + r]
            scores = torch.mm(qt, keys.t()).mul_(scale)  # [qt * H, kt]
            mask = _causal_mask(q_pos, j0, j1)
            if mask is not None:
                scores.view(i1 - i0, heads, -1).masked_fill_(mask[:, None, :], float("-inf"))
            state.update(scores, keys[:, :latent_dim])
        out[i0:i1] = state.result().view(i1 - i0, heads, latent_dim)
    return out


def attend_decompressed(q_nope: torch.Tensor, q_rope: torch.Tensor, read_keys: KeyReader, start: int, latent_dim: int,
                        w_uk_t: torch.Tensor, w_uv_t: torch.Tensor, scale: float, tiles: Tiles) -> torch.Tensor:
    """Multi-head form. q_nope [n, H, nope], q_rope [n, H, r] of positions start..; `read_keys(a, b)` -> cached
    rows [b - a, c + r]; w_uk_t [H, c, nope] and w_uv_t [H, c, v] expand a latent into a head's key and value
    -> attention outputs [n, H, v] (float32). Key tiles are the outer loop, so each is expanded once per step;
    the softmax state of every query [n, H, v] is linear in n."""
    n, heads, _ = q_nope.shape
    v_dim = w_uv_t.shape[-1]
    ctx = start + n
    qh = torch.cat([q_nope, q_rope], dim=-1).float().transpose(0, 1).contiguous()  # [H, n, nope + r]
    states = [_Softmax.empty(heads * min(tiles.queries, n - i0), v_dim, q_nope.device)
              for i0 in range(0, n, tiles.queries)]
    w_uk_t, w_uv_t = w_uk_t.float(), w_uv_t.float()
    for j0 in range(0, ctx, tiles.keys):
        j1 = min(ctx, j0 + tiles.keys)
        rows = read_keys(j0, j1).float()  # [kt, c + r]
        latent = rows[:, :latent_dim].expand(heads, -1, -1)  # [H, kt, c]
        k_rope = rows[:, latent_dim:].expand(heads, -1, -1)  # [H, kt, r]
        keys = torch.cat([torch.bmm(latent, w_uk_t), k_rope], dim=-1)  # [H, kt, nope + r]
        values = torch.bmm(latent, w_uv_t)  # [H, kt, v]
        for t, i0 in enumerate(range(0, n, tiles.queries)):
            i1 = min(n, i0 + tiles.queries)
            if start + i1 - 1 < j0:  # the tile lies wholly in these queries' future
                continue
            scores = torch.bmm(qh[:, i0:i1], keys.transpose(1, 2)).mul_(scale)  # [H, qt, kt]
            mask = _causal_mask(torch.arange(start + i0, start + i1, device=q_nope.device), j0, j1)
            if mask is not None:
                scores.masked_fill_(mask[None], float("-inf"))
            states[t].update(scores.view(heads * (i1 - i0), -1), values)
    out = torch.empty(heads, n, v_dim, dtype=torch.float32, device=q_nope.device)
    for t, i0 in enumerate(range(0, n, tiles.queries)):
        i1 = min(n, i0 + tiles.queries)
        out[:, i0:i1] = states[t].result().view(heads, i1 - i0, v_dim)
    return out.transpose(0, 1)  # [n, H, v]
