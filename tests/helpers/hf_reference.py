"""Builds random tiny DeepSeek-V3 checkpoints with transformers itself — the oracle for k2serve's model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def tiny_hf_config(seed: int, n_routed_experts: int, n_group: int = 1, topk_group: int = 1, **over) -> DeepseekV3Config:
    kw = dict(
        vocab_size=320, hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=n_routed_experts, num_experts_per_tok=4, n_shared_experts=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
        routed_scaling_factor=2.827, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=512,
                             mscale=1.0, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0),
        bos_token_id=1, eos_token_id=2,
    )
    kw.update(over)
    return DeepseekV3Config(**kw)


def random_hf_model(config: DeepseekV3Config, seed: int) -> DeepseekV3ForCausalLM:
    """Random weights scaled so activations stay O(1) and routing is non-trivial (biased, grouped)."""
    g = torch.Generator().manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            bias = getattr(m, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
    return model


def save_bf16(model: DeepseekV3ForCausalLM, path: Path) -> Path:
    """A bf16 checkpoint in several shards, as real checkpoints ship."""
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="200KB")
    model.float()
    return path


def load_hf_fp32(path: Path, config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    """transformers does not know `kimi_k2`: always load with the explicit DeepseekV3Config."""
    return DeepseekV3ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
