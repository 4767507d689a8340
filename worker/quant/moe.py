"""One interface for the routed-expert MLP of an expert shard: the torch reference (CPU; every kernel test's
oracle) and the Triton fused-MoE kernel (CUDA). The engine calls `select_moe_backend(device)` once and never
branches on the device again.

Contract of a backend `f(x, topk_ids, topk_weights, shard, *, deterministic=False, combine=True)`:
- x [T, H] activations; topk_ids [T, k] int64 *global* expert ids; topk_weights [T, k] float32 routing weights
  (already normalised and scaled by routed_scaling_factor).
- Experts outside [shard.start, shard.start + shard.num_local) contribute nothing (another rank owns them).
- combine=True returns [T, H] = sum over slots 0..k-1, in slot order, of weight * expert_mlp(x);
  combine=False returns the per-slot products [T, k, H] (zeros for slots this shard does not own) so expert
  parallelism can gather them from every rank and sum in the same slot order, bit for bit.
- deterministic=True makes every row's result independent of which other rows share the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from k2serve.worker.quant.int4 import dequantize


CHECKPOINT_LAYOUT = "compressed-tensors"  # the words and scales as the checkpoint stores them


@dataclass
class ExpertShard:
    """Routed experts [start, start + num_local) of one MoE layer, as one rank holds them.

    Quantized (K2 Thinking): w13 int32 [E_l, 2I, H/8] (gate rows, then up rows), w13_scale [E_l, 2I, H/32],
    w2 int32 [E_l, H, I/8], w2_scale [E_l, H, I/32] — the checkpoint's own packed words, only stacked.
    Dense (bf16 checkpoints): w13 [E_l, 2I, H], w2 [E_l, H, I], scales None.
    A backend may keep its shards in its own layout (`prepare_experts`; `layout` names it, e.g. cpu_int4.py's).
    """

    start: int
    num_experts: int  # experts in the whole layer, all ranks together
    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    layout: str = CHECKPOINT_LAYOUT

    @property
    def quantized(self) -> bool:
        return self.w13_scale is not None

    @property
    def num_local(self) -> int:
        return self.w13.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[1]

    def nbytes(self) -> int:
        tensors = [self.w13, self.w2, self.w13_scale, self.w2_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def expert_weights(self, local: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense float32 (w13 [n, 2I, H], w2 [n, H, I]) of the given local experts; dequantized on the fly (all
        of them in one call) so the resident copy stays INT4."""
        if self.layout != CHECKPOINT_LAYOUT:
            raise ValueError(f"expert weights of a shard in the {self.layout!r} layout can only be read by its backend")
        idx = torch.as_tensor(local, dtype=torch.int64, device=self.w13.device)
        if self.w13_scale is None or self.w2_scale is None:
            return self.w13[idx].float(), self.w2[idx].float()
        return dequantize(self.w13[idx], self.w13_scale[idx]), dequantize(self.w2[idx], self.w2_scale[idx])


def linear(x: torch.Tensor, w: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """x [N, in] @ w[out, in]^T. In deterministic mode each row is its own matrix-vector product: a batched
    GEMM's blocking depends on N and on a row's position in the batch, a GEMV's does not."""
    if not deterministic:
        return F.linear(x, w)
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[0])
    return torch.stack([torch.mv(w, row) for row in x])


def reference_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shard: ExpertShard,
    *,
    deterministic: bool = False,
    combine: bool = True,
) -> torch.Tensor:
    """Dequantize + matmul in float32, one matmul pair per hit expert (row by row in deterministic mode, see
    `linear`). Measured on CPU: one padded batched matmul over all hit experts was no faster; the
    dequantization of the hit experts is most of the cost."""

    def run(xs: torch.Tensor, hit: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w13, w2 = shard.expert_weights(hit)  # [n_hit, 2I, H], [n_hit, H, I]
        out = []
        for i, chunk in enumerate(xs.float().split(counts)):
            gate, up = linear(chunk, w13[i], deterministic).chunk(2, dim=-1)  # [n, I] each
            out.append(linear(F.silu(gate) * up, w2[i], deterministic))  # [n, H]
        return torch.cat(out)

    return route_to_experts(x, topk_ids, topk_weights, shard, combine, run)


ExpertRows = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def route_to_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, shard: ExpertShard,
                     combine: bool, run: ExpertRows, rows_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the torch backends share around their expert math: the (token, slot) pairs this shard owns, sorted
    by expert; `run(xs [P, H] in rows_dtype, hit [n_hit] local expert ids, counts)` returns each pair's expert
    output [P, H] (rows grouped by expert in `hit` order, `counts[i]` rows for hit[i]); weighted and combined
    per the `MoEBackend` contract.

    A prefill makes these [T * k, H] tensors megabytes each, so each is made once: the tokens are cast to
    rows_dtype before the k-fold gather (half the bytes for bf16), and when this shard owns every expert the
    slots are gathered back in one pass, with nothing zero-filled. (The weighting casts run's output first: one
    product of a bf16 and a float32 operand took twice as long as the cast and a float32 product.)"""
    T, k = topk_ids.shape
    H = shard.hidden_size
    local_ids = (topk_ids - shard.start).flatten()  # [T*k], pair t*k + s = token t's slot s
    owns_all = shard.num_local == shard.num_experts  # every pair is this shard's
    if owns_all:
        pairs, ids = torch.arange(T * k, device=x.device), local_ids  # [P = T*k] each
    else:
        pairs = ((local_ids >= 0) & (local_ids < shard.num_local)).nonzero().flatten()  # [P] owned pairs
        ids = local_ids[pairs]  # [P]
    if not pairs.numel():
        return x.new_zeros(T, k, H) if not combine else x.new_zeros(T, H)
    order = ids.argsort(stable=True)  # [P] pairs grouped by expert, in pair order within one
    pairs, ids = pairs[order], ids[order]
    per_expert = torch.bincount(ids, minlength=shard.num_local)  # [E_l]
    hit = per_expert.nonzero().flatten()  # [n_hit]
    # index_select, not advanced indexing: ~3x faster for a prefill's rows on CPU (one copy per row)
    y = run(x.to(rows_dtype).index_select(0, pairs // k), hit, per_expert[hit].tolist())  # [P, H]
    weighted = y.float().mul_(topk_weights.flatten().index_select(0, pairs).float().unsqueeze(-1))  # [P, H]
    if owns_all:  # pairs is a permutation: gathering rows back by its inverse beats scattering them (2x on CPU)
        inverse = torch.empty_like(pairs)
        inverse[pairs] = torch.arange(T * k, device=x.device)
        slots = weighted.index_select(0, inverse)  # [T*k, H]
    else:
        slots = x.new_zeros(T * k, H, dtype=torch.float32).index_copy_(0, pairs, weighted)
    slots = slots.view(T, k, H)
    if not combine:
        return slots.to(x.dtype)
    return sum_slots(slots).to(x.dtype)


def sum_slots(slots: torch.Tensor) -> torch.Tensor:
    """[T, k, H] -> [T, H], adding slots in order 0..k-1 so every path sums in the same order."""
    out = slots[:, 0].clone()
    for s in range(1, slots.shape[1]):
        out += slots[:, s]
    return out


class MoEBackend(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shard: ExpertShard,
        *,
        deterministic: bool = False,
        combine: bool = True,
    ) -> torch.Tensor: ...


def select_moe_backend(device: torch.device) -> MoEBackend:
    """The Triton kernel where CUDA runs the model, torch's CPU int4 GEMM on CPU (which hands dense shards to
    the reference)."""
    if device.type == "cuda" and torch.cuda.is_available():
        from k2serve.worker.quant.triton_moe import fused_moe

        return fused_moe
    from k2serve.worker.quant.cpu_int4 import cpu_int4_moe

    return cpu_int4_moe


def prepare_experts(shards: dict[int, ExpertShard], device: torch.device, deterministic: bool = False
                    ) -> dict[int, ExpertShard]:
    """The shards in the layout `select_moe_backend(device)` reads, converted once when a model is built
    (shards already converted, or that the backend cannot take, come back as they are).

    Deterministic mode on CPU keeps the checkpoint layout, which the backend runs through the float32
    reference: the int4 GEMM's rows are batch-invariant too, but its bf16 activations turn a last-bit
    difference upstream into a visible change of the logits (measured: one seeded token in 2 of 7 clean-clone
    runs of the failover test moved), and deterministic mode exists to make resumed chains bit-identical."""
    if deterministic or (device.type == "cuda" and torch.cuda.is_available()):
        return shards
    from k2serve.worker.quant.cpu_int4 import repack

    return {layer: repack(shard) for layer, shard in shards.items()}
