"""The feed-forward halves of K2's layers: the dense SwiGLU MLP (first_k_dense_replace layers, shared experts)
and the MoE block (router + routed experts through a `MoEExecutor` + shared experts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from k2serve.k2format.model_config import K2Config
from k2serve.worker.model.linear import Projection, Projections
from k2serve.worker.model.rowwise import rowwise
from k2serve.worker.quant.moe import ExpertShard, MoEBackend


@dataclass
class DenseMLP:
    gate: Projection  # [I, D]
    up: Projection  # [I, D]
    down: Projection  # [D, I]
    det: bool = False

    @classmethod
    def from_weights(cls, proj: Projections, prefix: str, det: bool) -> "DenseMLP":
        return cls(proj.get(prefix + "gate_proj.weight"), proj.get(prefix + "up_proj.weight"),
                   proj.get(prefix + "down_proj.weight"), det)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        return self.down(F.silu(self.gate(x, self.det)) * self.up(x, self.det), self.det)


class ExpertGate:
    """DeepSeek-V3 / K2 routing: sigmoid scores; `noaux_tc` picks experts by score + e_score_correction_bias
    within the best `topk_group` of `n_group` groups, and weights them by the unbiased scores."""

    def __init__(self, config: K2Config, w: dict[str, torch.Tensor], proj: Projections, prefix: str,
                 det: bool) -> None:
        self.gate = proj.get(prefix + "gate.weight", torch.float32)  # [E, D]
        bias = w.get(prefix + "gate.e_score_correction_bias")
        if config.topk_method == "noaux_tc" and bias is None:
            raise KeyError(f"{prefix}gate.e_score_correction_bias is required for topk_method noaux_tc")
        self.bias = None if bias is None else bias.float()  # [E]
        self.c = config
        self.det = det

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
        c = self.c
        logits = self.gate(x.float(), self.det)  # [T, E]
        # In deterministic mode a token's scores must not depend on its batch (rowwise.py); softmax reduces each
        # row alone already. Elsewhere the GEMMs before it depend on the batch anyway.
        if c.scoring_func == "sigmoid":
            scores = rowwise(torch.sigmoid, logits) if self.det else torch.sigmoid(logits)
        else:
            scores = logits.softmax(dim=-1)
        choice = scores if self.bias is None or c.topk_method != "noaux_tc" else scores + self.bias
        if c.n_group > 1 and c.topk_method != "greedy":
            grouped = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)  # [T, G, E/G]
            if c.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
            else:
                group_scores = grouped.amax(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        topk_ids = choice.topk(c.num_experts_per_tok, dim=-1).indices  # [T, k]
        weights = scores.gather(1, topk_ids)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, weights * c.routed_scaling_factor


class MoEExecutor(Protocol):
    """Runs the routed experts of one MoE layer for this rank's tokens: locally, or across an expert-parallel
    group (dispatch, local experts, combine)."""

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LocalExperts:
    """All experts of every MoE layer live in this process."""

    shards: dict[int, ExpertShard]
    backend: MoEBackend
    deterministic: bool = False

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend(x, topk_ids, topk_weights, self.shards[layer], deterministic=self.deterministic)


@dataclass
class ExpertLoad:
    """Tokens routed to each expert of each MoE layer since the last `take()` (feeds the expert-load dashboard)."""

    counts: torch.Tensor  # [num_moe_layers, E] int64
    layer_index: dict[int, int] = field(default_factory=dict)

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        row = self.counts[self.layer_index[layer]]
        row += torch.bincount(topk_ids.flatten().cpu(), minlength=row.shape[0])

    def take(self) -> torch.Tensor:
        out = self.counts.clone()
        self.counts.zero_()
        return out


class MoEBlock:
    def __init__(self, config: K2Config, layer: int, w: dict[str, torch.Tensor], proj: Projections,
                 experts: MoEExecutor, load: ExpertLoad, det: bool) -> None:
        prefix = f"model.layers.{layer}.mlp."
        self.layer = layer
        self.expert_gate = ExpertGate(config, w, proj, prefix, det)
        self.shared = DenseMLP.from_weights(proj, prefix + "shared_experts.", det) if config.n_shared_experts else None
        self.experts = experts
        self.load = load

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]. Called with T = 0 too: an expert-parallel rank with no tokens still joins."""
        topk_ids, topk_weights = self.expert_gate(x)
        self.load.add(self.layer, topk_ids)
        out = self.experts(self.layer, x, topk_ids, topk_weights).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out
