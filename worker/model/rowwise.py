"""Elementwise transcendental math (sigmoid, cos, sin) whose result for a row does not depend on how many rows
share the call — what deterministic mode needs for a token decoded alone to equal the same token in a prefill.

ATen's CPU loops compute whole vector chunks with SLEEF and the leftover elements at the end of a tensor (or of
a thread's share) with scalar libm, and the two can differ in the last bit. The router's scores for one decode
token (E numbers) or the rope angles of one position (r/2 numbers) may all be leftovers, while the same row
inside a prefill is vectorized. `rowwise` pads every row to a multiple of `PAD` elements, so every element lies
in a full chunk, and runs at most `CHUNK` elements per call, below ATen's parallel grain, so no thread split
cuts a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PAD = 64  # a multiple of the widest chunk: 2 vectors of 16 floats (AVX-512); AVX2's is 16
CHUNK = 32768  # ATen's GRAIN_SIZE: smaller tensors run on one thread


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise) applied to x [..., n], each row computed as if alone."""
    n = x.shape[-1]
    width = -(-n // PAD) * PAD
    rows = x.reshape(-1, n)  # [R, n]
    padded = rows.new_zeros(rows.shape[0], width)  # [R, width]
    padded[:, :n] = rows
    step = max(1, CHUNK // width)
    out = torch.cat([fn(padded[i:i + step]) for i in range(0, rows.shape[0], step)]) if rows.shape[0] else padded
    return out[:, :n].reshape(x.shape)
