"""`rowwise`: a row's transcendental math gives the same bits alone and in any batch."""

from __future__ import annotations

import pytest
import torch

from k2serve.worker.model.rowwise import CHUNK, rowwise


@pytest.mark.parametrize("fn", [torch.sigmoid, torch.cos, torch.sin])
@pytest.mark.parametrize("width", [8, 16, 100])
def test_row_alone_equals_row_in_batch(fn, width: int) -> None:  # noqa: ANN001
    rows = CHUNK // 64 + 37  # more than one chunk, and not a multiple of anything
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(width)) * 4
    batch = rowwise(fn, x)
    assert batch.shape == x.shape
    alone = torch.cat([rowwise(fn, x[i:i + 1]) for i in range(0, rows, 97)])
    assert torch.equal(alone, batch[::97])
    assert torch.allclose(batch, fn(x), rtol=1e-6, atol=1e-7)  # the same function, only the last bit may move


def test_keeps_leading_dims_and_empty_input() -> None:
    x = torch.randn(3, 5, 16)
    assert torch.equal(rowwise(torch.sigmoid, x)[1], rowwise(torch.sigmoid, x[1]))
    assert rowwise(torch.sigmoid, torch.empty(0, 16)).shape == (0, 16)
