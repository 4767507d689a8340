"""The K2 / DeepSeek-V3 decoder: embeddings, `num_hidden_layers` × (MLA + dense MLP or MoE), final norm, lm_head.

One implementation for every size: the built-in tiny model on a laptop and Kimi K2 Thinking on GPUs differ only
in the config, the weights and the MoE backend (`k2serve.worker.quant.moe.select_moe_backend`).
"""

from __future__ import annotations

import torch

from k2serve.worker.model.batch import ForwardBatch, LatentKVCache
from k2serve.k2format.model_config import K2Config
from k2serve.worker.model.ffn import DenseMLP, ExpertLoad, LocalExperts, MoEBlock, MoEExecutor
from k2serve.worker.model.linear import Projections
from k2serve.worker.model.mla import MLAttention
from k2serve.worker.model.norm import rms_norm
from k2serve.worker.model.rope import Rotary
from k2serve.worker.quant.moe import ExpertShard, prepare_experts, select_moe_backend


class K2Model:
    """Inference-only forward over a `ForwardBatch` and a `LatentKVCache` (no autograd, no nn.Module: the
    weights are plain tensors so expert shards can be swapped in by the loader without a module tree)."""

    def __init__(
        self,
        config: K2Config,
        dense: dict[str, torch.Tensor],
        experts: dict[int, ExpertShard] | MoEExecutor,
        *,
        deterministic: bool = False,
        expert_load: ExpertLoad | None = None,
        projections: Projections | None = None,
    ) -> None:
        self.config = config
        self.deterministic = deterministic
        self._dense = dense
        self._proj = proj = projections or Projections(dense)
        # lm_head first: a tied embedding is then read through the projection's one copy
        self.lm_head = proj.get("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
        embed = dense["model.embed_tokens.weight"]
        self.device, self.dtype = embed.device, embed.dtype
        # A twin in the other mode (`with_determinism`) prepares these shards in its own layout; a model given
        # an executor (expert-parallel ranks: one mode per group) shares it.
        self._shards = experts if isinstance(experts, dict) else None
        if isinstance(experts, dict):
            experts = prepare_experts(experts, self.device, deterministic)
        self._experts = experts
        self.embed = embed  # [V, D]
        self.final_norm = dense["model.norm.weight"]
        if isinstance(experts, dict):
            experts = LocalExperts(experts, select_moe_backend(self.device), deterministic)
        moe_layers = config.moe_layers
        self.expert_load = expert_load or ExpertLoad(
            torch.zeros(len(moe_layers), config.n_routed_experts, dtype=torch.int64),
            {layer: i for i, layer in enumerate(moe_layers)},
        )
        self.rotary = Rotary(config, self.device)
        self.layers: list[tuple[torch.Tensor, MLAttention, torch.Tensor, DenseMLP | MoEBlock]] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            ffn: DenseMLP | MoEBlock
            if config.is_moe_layer(i):
                ffn = MoEBlock(config, i, dense, proj, experts, self.expert_load, deterministic)
            else:
                ffn = DenseMLP.from_weights(proj, p + "mlp.", deterministic)
            attn = MLAttention(config, i, dense, proj, deterministic)
            self.layers.append((dense[p + "input_layernorm.weight"], attn, dense[p + "post_attention_layernorm.weight"], ffn))

    def with_determinism(self, deterministic: bool) -> "K2Model":
        """A twin sharing every weight (and their prepared projections) and the expert-load counters, computing
        in the other mode."""
        return K2Model(self.config, self._dense, self._shards if self._shards is not None else self._experts,
                       deterministic=deterministic, expert_load=self.expert_load, projections=self._proj)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: LatentKVCache) -> torch.Tensor:
        """-> logits [B, V] (float32) for `batch.logits_rows`."""
        eps = self.config.rms_norm_eps
        h = self.embed[batch.input_ids.to(self.device)]  # [T, D]
        cos, sin = self.rotary.cos_sin(batch.positions.to(self.device), self.dtype, self.deterministic)  # [T, r/2]
        for in_norm, attn, post_norm, ffn in self.layers:
            if batch.num_tokens:
                h = h + attn(rms_norm(h, in_norm, eps), batch, kv, cos, sin, self.rotary)
            h = h + ffn(rms_norm(h, post_norm, eps))
        rows = rms_norm(h[batch.logits_rows.to(self.device)], self.final_norm, eps)  # [B, D]
        return self.lm_head(rows, self.deterministic).float()
