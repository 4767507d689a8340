"""The Triton fused INT4 MoE compiled for the GPU (marker `gpu`: bench/gpu_check.sh runs these on a GPU
machine; the default run deselects them), in bf16 on K2 Thinking's expert-shard shapes (hidden 7168,
intermediate 2048, 384 experts top-8, split over EP 8 or 16), against the float32 torch reference on the same
device, on fresh random packed words, scales, activations and routing. test_triton_moe.py runs the same kernel
under the CPU interpreter (no bf16 there).

Error measures over every output element: max|out - ref| / max|ref| and mean|out - ref| / mean|ref|. The kernel
rounds the dequantized weights and silu(gate) * up to bf16 and the output to bf16; an emulation of exactly those
roundings on the CPU stays near bf16's epsilon (2^-8) on both, the tolerances leave headroom above it."""

from __future__ import annotations

import pytest
import torch

from k2serve.worker.quant.moe import reference_moe
from k2serve.worker.quant.triton_workload import (
    K2_EXPERTS, K2_HIDDEN, K2_INTERMEDIATE, K2_TOP_K, MoEShape, random_shard, shard_routing,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
MAX_REL_ERR, MEAN_REL_ERR = 2e-2, 1e-2


def k2_shape(ep: int) -> MoEShape:
    return MoEShape(hidden=K2_HIDDEN, intermediate=K2_INTERMEDIATE, num_experts=K2_EXPERTS, top_k=K2_TOP_K, ep=ep)


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.float() - ref.float()).abs()
    return float(diff.max() / ref.float().abs().max()), float(diff.mean() / ref.float().abs().mean())


@pytest.mark.parametrize("ep,tokens", [(8, 1), (8, 64), (16, 7), (16, 256)])
def test_bf16_matches_the_reference_on_k2_shards(ep: int, tokens: int) -> None:
    """Every token routed to this shard (what an EP dispatch delivers), batch sizes across the tuned buckets."""
    from k2serve.worker.quant.triton_moe import fused_moe  # triton is imported where a test runs, not at collection

    shape = k2_shape(ep)
    shard = random_shard(shape, CUDA, seed=ep * 1000 + tokens)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, shape.hidden, device=CUDA).to(torch.bfloat16)  # [T, H]
    ids, weights = shard_routing(shape, tokens, CUDA, seed=tokens)  # [T, k] each
    for combine in (True, False):
        got = fused_moe(x, ids, weights, shard, combine=combine)
        ref = reference_moe(x, ids, weights, shard, combine=combine)
        assert got.dtype == torch.bfloat16 and got.shape == ref.shape
        assert bool(torch.isfinite(got).all())
        assert float(ref.float().abs().max()) > 0, "an all-zero reference checks nothing"
        max_rel, mean_rel = errors(got, ref)
        assert max_rel <= MAX_REL_ERR and mean_rel <= MEAN_REL_ERR, (combine, max_rel, mean_rel)


def test_slots_of_other_shards_contribute_nothing() -> None:
    """Routing over the whole layer: most of a token's 8 experts live on other ranks (slots this shard skips)."""
    from k2serve.worker.quant.triton_moe import fused_moe  # triton is imported where a test runs, not at collection

    shape = k2_shape(8)
    shard = random_shard(shape, CUDA, seed=7)
    torch.manual_seed(7)
    x = torch.randn(48, shape.hidden, device=CUDA).to(torch.bfloat16)
    ids = torch.rand(48, shape.num_experts, device=CUDA).argsort(dim=1)[:, : shape.top_k]  # [T, k] global ids
    ids[0] = torch.arange(shape.num_local, shape.num_local + shape.top_k, device=CUDA)  # one token with no expert here
    weights = torch.rand(48, shape.top_k, device=CUDA) + 0.1
    got = fused_moe(x, ids, weights, shard)
    ref = reference_moe(x, ids, weights, shard)
    assert float(got[0].float().abs().max()) == 0.0
    owned = (ids < shape.num_local).any(dim=1)
    assert int(owned.sum()) > 8, "too few tokens touch this shard to check anything"
    max_rel, mean_rel = errors(got[owned], ref[owned])
    assert max_rel <= MAX_REL_ERR and mean_rel <= MEAN_REL_ERR, (max_rel, mean_rel)


def test_deterministic_rows_do_not_depend_on_the_batch() -> None:
    """deterministic=True pins the batch-independent tile config: each row, computed alone, is bit-identical to
    the same row inside a batch of 96 (which would otherwise pick another tuned config)."""
    from k2serve.worker.quant.triton_moe import fused_moe  # triton is imported where a test runs, not at collection

    shape = k2_shape(16)
    shard = random_shard(shape, CUDA, seed=11)
    torch.manual_seed(11)
    x = torch.randn(96, shape.hidden, device=CUDA).to(torch.bfloat16)
    ids, weights = shard_routing(shape, 96, CUDA, seed=11)
    together = fused_moe(x, ids, weights, shard, deterministic=True)
    for i in (0, 1, 37, 95):
        alone = fused_moe(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], shard, deterministic=True)
        assert torch.equal(alone[0], together[i]), f"row {i}"
    max_rel, mean_rel = errors(together, reference_moe(x, ids, weights, shard))
    assert max_rel <= MAX_REL_ERR and mean_rel <= MEAN_REL_ERR, (max_rel, mean_rel)
