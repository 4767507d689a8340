"""K2's INT4 layout (compressed-tensors `pack-quantized`, symmetric, group 32).

Per quantized Linear: `weight_packed` int32 [out, in/8] where element 8g+k of a row sits in bits 4k..4k+3 of
word g (lowest nibble first) and stores q + 8; `weight_scale` [out, in/32]; `weight_shape` [out, in].
"""

from __future__ import annotations

import sys

import torch

GROUP_SIZE = 32
PACK_FACTOR = 8  # int4 values per int32 word
QMIN, QMAX = -8, 7
_SHIFTS = tuple(range(0, 32, 4))


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.int64, device=device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [..., in] -> int32 [..., in/8]."""
    if q.shape[-1] % PACK_FACTOR:
        raise ValueError(f"input dim {q.shape[-1]} is not a multiple of {PACK_FACTOR}")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"int4 values must lie in [{QMIN}, {QMAX}]")
    nibbles = (q.to(torch.int64) + 8).view(*q.shape[:-1], -1, PACK_FACTOR)  # [..., in/8, 8]
    words = (nibbles << _shifts(q.device)).sum(-1)  # [..., in/8] in [0, 2^32)
    # Reinterpret the unsigned 32-bit word as int32 (two's complement), as the checkpoint stores it.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., in/8] -> int8 [..., in] in [-8, 7].

    Reads the words as little-endian bytes: byte j of a word holds nibbles 2j (low half) and 2j+1 (high half),
    so elementwise uint8 ops replace 64-bit shifts (about 3.5x faster on CPU)."""
    if sys.byteorder != "little":
        raise RuntimeError("unpack_int4 reads packed words as little-endian bytes; this host is big-endian")
    data = packed.contiguous().view(torch.uint8)  # [..., in/2]
    low, high = (data & 0xF).to(torch.int8), (data >> 4).to(torch.int8)
    return torch.stack([low, high], dim=-1).flatten(-2) - 8


def quantize_rtn(
    w: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization as compressed-tensors does it (scale = absmax / 7.5, clamp to
    [-8, 7]); w [out, in] -> (packed int32 [out, in/8], scale [out, in/group]).

    q is computed against the scale as stored (after rounding to scale_dtype) so dequantization reproduces
    exactly what was packed."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"input dim {in_f} is not a multiple of the group size {group_size}")
    groups = w.float().view(out_f, in_f // group_size, group_size)  # [out, G, g]
    absmax = groups.abs().amax(-1)  # [out, G]
    scale = (absmax / ((QMAX - QMIN) / 2)).to(scale_dtype)
    # An all-zero group keeps scale 1 so it dequantizes to zeros instead of dividing by zero.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(QMIN, QMAX).to(torch.int8)  # [out, G, g]
    return pack_int4(q.view(out_f, in_f)), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed int32 [..., out, in/8], scale [..., out, in/group] -> weights [..., out, in] in `dtype`.

    The nibbles stay unsigned (0..15) until one fused `(q - 8) * scale` that also promotes to float: a CPU
    decode step dequantizes every hit expert, and each extra full-size pass costs as much as the matmuls."""
    if sys.byteorder != "little":
        raise RuntimeError("dequantize reads packed words as little-endian bytes; this host is big-endian")
    groups = scale.shape[-1]
    n_in = packed.shape[-1] * PACK_FACTOR
    if n_in % groups:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not divide packed shape {tuple(packed.shape)}")
    data = packed.contiguous().view(torch.uint8)  # [..., out, in/2]
    nibbles = torch.stack([data & 0xF, data >> 4], dim=-1)  # [..., out, in/2, 2]: elements 2j, 2j+1 (0..15)
    grouped = nibbles.view(*packed.shape[:-1], groups, n_in // groups)  # [..., out, G, group]
    w = (grouped.view(torch.int8) - 8) * scale.to(torch.float32).unsqueeze(-1)  # [..., out, G, group]
    return w.flatten(-2).to(dtype)
