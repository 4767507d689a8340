"""The serving config's `model.dtype` as a torch dtype on the device a rank computes on."""

from __future__ import annotations

import torch

NAMED = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs; float32 on CPUs, where the tests' greedy-equality references and the CPU INT4
    expert path are float32 (bf16 GEMMs run faster on CPUs with AVX512-BF16: see bench/RESULTS.md)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in NAMED:
        raise ValueError(f"model.dtype {name!r}: expected auto or one of {', '.join(NAMED)}")
    return NAMED[name]
