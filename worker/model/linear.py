"""The model's dense projections, y = x W^T over checkpoint weights W [out, in], each weight prepared once in the
layout its device multiplies fastest.

On CPU a weight is kept transposed, [in, out] contiguous: MKL's SGEMM on a row-major right-hand side runs a
decode-sized batch faster than on the transposed view `F.linear` hands it, which it repacks every call (tiny-k2,
one thread, float32, [32, 256] x [256, 128]: 20 vs 36 µs with the weight in cache, 54 vs 74 µs without; ~5%
apart from 256 rows on). In the engine's closed loop at 32 concurrent (mixed lengths, 3 alternating pairs):
+0.7%, +1.5%, +2.6% tokens/s. CUDA keeps W as it is: cuBLAS reads either order at the same speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2serve.worker.quant.moe import linear


class Projection:
    """One weight, prepared; called once per layer and step, so the call does no more than the GEMM."""

    __slots__ = ("weight", "transposed")

    def __init__(self, w: torch.Tensor) -> None:
        """w [out, in]."""
        self.transposed = w.device.type == "cpu"
        self.weight = w.t().contiguous() if self.transposed else w  # [in, out] on CPU, [out, in] elsewhere

    def __call__(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """x [N, in] -> [N, out]; row by row in deterministic mode (see `linear`)."""
        if deterministic:
            return linear(x, self.weight.t() if self.transposed else self.weight, True)
        return torch.mm(x, self.weight) if self.transposed else F.linear(x, self.weight)


class Projections:
    """Prepares each named weight once; a model and its twin in the other mode (`K2Model.with_determinism`)
    share them. A weight prepared without a cast replaces its entry in `weights` by a view of the prepared tensor,
    so the checkpoint's original is freed and every weight lives once (a later `Projections` over the same dict
    finds it already in layout and copies nothing)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._weights = weights
        self._made: dict[tuple[str, torch.dtype | None], Projection] = {}

    def get(self, name: str, dtype: torch.dtype | None = None) -> Projection:
        """The projection of weight `name` [out, in] (cast to `dtype` first when given)."""
        key = (name, dtype)
        if key not in self._made:
            w = self._weights[name]
            cast = w if dtype is None else w.to(dtype)
            made = self._made[key] = Projection(cast)
            if cast is w and made.transposed:
                self._weights[name] = made.weight.t()  # [out, in] view of the one copy
        return self._made[key]
