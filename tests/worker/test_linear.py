"""Projections: the CPU layout (weights kept transposed) computes x W^T; deterministic mode goes row by row; a
model and its twin in the other mode share the prepared weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers.tiny import tiny_weights
from k2serve.worker.model.k2 import K2Model
from k2serve.worker.model.linear import Projection, Projections


def test_a_cpu_projection_keeps_the_weight_transposed_and_computes_x_w_t() -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 32, generator=g)  # [out, in]
    x = torch.randn(5, 32, generator=g)
    p = Projection(w)
    assert p.transposed and p.weight.shape == (32, 48) and p.weight.is_contiguous()
    torch.testing.assert_close(p(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_deterministic_rows_do_not_depend_on_their_batch() -> None:
    g = torch.Generator().manual_seed(8)
    p = Projection(torch.randn(40, 24, generator=g))
    x = torch.randn(6, 24, generator=g)
    batched = p(x, deterministic=True)  # [6, 40]
    for i in range(6):
        assert torch.equal(p(x[i : i + 1], deterministic=True)[0], batched[i])
    assert p(x[:0], deterministic=True).shape == (0, 40)


def test_projections_are_made_once_and_shared_with_the_twin_model() -> None:
    g = torch.Generator().manual_seed(9)
    weights = {"a": torch.randn(8, 4, generator=g)}
    proj = Projections(weights)
    assert proj.get("a") is proj.get("a")
    as_f64 = proj.get("a", torch.float64)
    assert as_f64 is not proj.get("a") and as_f64.weight.dtype == torch.float64
    w = tiny_weights()
    model = K2Model(w.config, w.dense, w.experts)
    twin = model.with_determinism(not model.deterministic)
    assert twin.lm_head is model.lm_head
