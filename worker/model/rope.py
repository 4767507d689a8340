"""Rotary position embedding for MLA's decoupled rope dims, with DeepSeek/K2 YaRN scaling."""

from __future__ import annotations

import math

import torch

from k2serve.k2format.model_config import K2Config, RopeConfig
from k2serve.worker.model.rowwise import rowwise


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: K2Config) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context fix)."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.rope_theta, rope.factor
    orig = rope.original_max_position_embeddings or 4096
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32.0, rope.beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim/2]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 - ramp  # high-frequency dims keep their original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class Rotary:
    """cos/sin tables for the rope dims, computed once per position set."""

    def __init__(self, config: K2Config, device: torch.device) -> None:
        dim = config.qk_rope_head_dim
        if config.rope.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(config.rope, dim)
        else:
            inv_freq = 1.0 / (config.rope.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.inv_freq = inv_freq.to(device)  # [r/2]
        self.interleave = config.rope_interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, exact_rows: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """exact_rows (deterministic mode): a position's angles do not depend on how many share the call."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [T, r/2]
        if exact_rows:
            cos, sin = rowwise(torch.cos, freqs), rowwise(torch.sin, freqs)
        else:
            cos, sin = torch.cos(freqs), torch.sin(freqs)
        return (cos * self.attention_factor).to(dtype), (sin * self.attention_factor).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., r]; cos/sin [T, r/2]. Interleaved pairs (x0, x1), (x2, x3)... rotate together, and the
        result is laid out de-interleaved (evens then odds) — the same for queries and keys, so dot products
        match DeepSeek's complex-number formulation."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c, s = cos.view(shape), sin.view(shape)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
