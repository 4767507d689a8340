"""The CPU INT4 backend (torch's int4 GEMM on repacked shards) against the torch reference on the checkpoint
layout, on fresh random weights quantized as `k2serve quantize` does. Error = max|out - ref| / max|ref|; the
bound is bf16 activations and outputs (W4A16), about 2^-8 relative per value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2serve.worker.quant.cpu_int4 import DENSE_MIN_ROWS, LAYOUT, cpu_int4_moe, dequantize_t, repack
from k2serve.worker.quant.int4 import quantize_rtn
from k2serve.worker.quant.moe import CHECKPOINT_LAYOUT, ExpertShard, reference_moe

TOLERANCE = 2e-2
NUM_EXPERTS, START, NUM_LOCAL, HIDDEN, INTER = 12, 4, 4, 128, 64


def quantized_shard(gen: torch.Generator, group_size: int = 32) -> ExpertShard:
    def experts(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scales = zip(*(quantize_rtn(torch.randn(out_f, in_f, generator=gen) / in_f**0.5, group_size)
                               for _ in range(NUM_LOCAL)))
        return torch.stack(packed), torch.stack(scales)

    w13, s13 = experts(2 * INTER, HIDDEN)
    w2, s2 = experts(HIDDEN, INTER)
    return ExpertShard(START, NUM_EXPERTS, w13, w2, s13, s2)


def routing(gen: torch.Generator, tokens: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct experts per token over the whole layer (some owned by other shards)."""
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:top_k] for _ in range(tokens)])  # [T, k]
    return ids, torch.rand(tokens, top_k, generator=gen) + 0.1


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize("tokens,top_k,combine", [(1, 3, True), (7, 3, True), (7, 3, False), (45, 4, True)])
def test_matches_reference(tokens: int, top_k: int, combine: bool) -> None:
    gen = torch.Generator().manual_seed(tokens * 10 + top_k)
    shard = quantized_shard(gen)
    packed = repack(shard)
    assert packed.layout == LAYOUT
    x = torch.randn(tokens, HIDDEN, generator=gen)
    ids, w = routing(gen, tokens, top_k)
    got = cpu_int4_moe(x, ids, w, packed, combine=combine)
    ref = reference_moe(x, ids, w, shard, combine=combine)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert torch.isfinite(got).all()
    assert float(ref.abs().max()) > 0.1  # a real signal, not zeros
    assert rel_err(got, ref) <= TOLERANCE
    if not combine:  # slots of experts other shards own stay exactly zero
        local = ids - START
        foreign = (local < 0) | (local >= NUM_LOCAL)
        assert foreign.any() and not got[foreign].any()


@pytest.mark.parametrize("combine", [True, False])
def test_a_shard_owning_every_expert_matches_the_reference(combine: bool) -> None:
    """Every (token, slot) pair is the shard's: the rows go back to their slots by the inverse permutation."""
    gen = torch.Generator().manual_seed(21)
    shard = dataclasses.replace(quantized_shard(gen), start=0, num_experts=NUM_LOCAL)
    x = torch.randn(19, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(NUM_LOCAL, generator=gen)[:3] for _ in range(19)])  # [T, 3]
    w = torch.rand(19, 3, generator=gen) + 0.1
    got = cpu_int4_moe(x, ids, w, repack(shard), combine=combine)
    ref = reference_moe(x, ids, w, shard, combine=combine)
    assert got.shape == ref.shape and float(ref.abs().max()) > 0.1
    assert rel_err(got, ref) <= TOLERANCE


def test_rows_do_not_depend_on_the_batch_or_thread_count() -> None:
    """A row alone, in a batch, and under 1 or 2 threads gives the same bits (a request's experts do not
    depend on what else is batched with it)."""
    gen = torch.Generator().manual_seed(7)
    packed = repack(quantized_shard(gen))
    x = torch.randn(33, HIDDEN, generator=gen)
    ids, w = routing(gen, 33, 4)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            batch = cpu_int4_moe(x, ids, w, packed)
            alone = torch.cat([cpu_int4_moe(x[i:i + 1], ids[i:i + 1], w[i:i + 1], packed) for i in range(33)])
            tail = cpu_int4_moe(x[5:], ids[5:], w[5:], packed)
            assert torch.equal(batch, alone) and torch.equal(batch[5:], tail)
            results.append(batch)
        assert torch.equal(results[0], results[1])
    finally:
        torch.set_num_threads(threads)


def test_dequantize_t_gives_the_checkpoint_weights_rounded_to_bf16() -> None:
    shard = quantized_shard(torch.Generator().manual_seed(5))
    packed = repack(shard)
    w13, w2 = shard.expert_weights(torch.arange(NUM_LOCAL))  # float32 [E, 2I, H], [E, H, I]
    assert packed.w13_scale is not None and packed.w2_scale is not None
    for e in range(NUM_LOCAL):
        assert torch.equal(dequantize_t(packed.w13[e], packed.w13_scale[e]), w13[e].bfloat16().t())
        assert torch.equal(dequantize_t(packed.w2[e], packed.w2_scale[e]), w2[e].bfloat16().t())


def test_experts_with_many_rows_take_the_dense_bf16_gemm() -> None:
    """Every token on 3 of the 4 local experts: each expert gets >= DENSE_MIN_ROWS rows (prefill sized), which
    go through dequantize + one bf16 GEMM; deterministic mode keeps them on the int4 GEMM."""
    gen = torch.Generator().manual_seed(11)
    shard = quantized_shard(gen)
    packed = repack(shard)
    tokens = DENSE_MIN_ROWS * 4 // 3 + 8
    x = torch.randn(tokens, HIDDEN, generator=gen)
    ids = START + torch.stack([torch.randperm(NUM_LOCAL, generator=gen)[:3] for _ in range(tokens)])  # [T, 3]
    assert int(torch.bincount(ids.flatten() - START).min()) >= DENSE_MIN_ROWS
    w = torch.rand(tokens, 3, generator=gen) + 0.1
    ref = reference_moe(x, ids, w, shard)
    dense = cpu_int4_moe(x, ids, w, packed)
    int4 = cpu_int4_moe(x, ids, w, packed, deterministic=True)
    assert float(ref.abs().max()) > 0.1
    assert rel_err(dense, ref) <= TOLERANCE and rel_err(int4, ref) <= TOLERANCE
    assert not torch.equal(dense, int4)  # two paths really ran
    assert torch.equal(int4[:1], cpu_int4_moe(x[:1], ids[:1], w[:1], packed, deterministic=True))


def test_no_owned_tokens_and_empty_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    packed = repack(quantized_shard(gen))
    x = torch.randn(3, HIDDEN, generator=gen)
    foreign = torch.tensor([[0, 1], [9, 10], [2, 11]])  # none in [START, START + NUM_LOCAL)
    assert not cpu_int4_moe(x, foreign, torch.rand(3, 2, generator=gen), packed).any()
    assert cpu_int4_moe(x[:0], foreign[:0], torch.rand(0, 2), packed).shape == (0, HIDDEN)


def test_repack_keeps_int4_bytes() -> None:
    """Same nibbles, scales doubled into (scale, zero) pairs (bf16 scales are 1/9 of a group-32 shard)."""
    shard = quantized_shard(torch.Generator().manual_seed(1))
    packed = repack(shard)
    words = shard.w13.numel() * 4 + shard.w2.numel() * 4
    scales = (shard.w13_scale.numel() + shard.w2_scale.numel()) * 2  # type: ignore[union-attr]
    assert shard.nbytes() == words + scales
    assert packed.nbytes() == words + 2 * scales
    assert repack(packed) is packed  # already converted
    with pytest.raises(ValueError, match="cpu-int4pack"):
        packed.expert_weights([0])


def test_shards_the_kernel_cannot_take_run_the_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    group_64 = quantized_shard(gen, group_size=64)
    dense = ExpertShard(START, NUM_EXPERTS, torch.randn(NUM_LOCAL, 2 * INTER, HIDDEN, generator=gen),
                        torch.randn(NUM_LOCAL, HIDDEN, INTER, generator=gen))
    for shard in (group_64, dense):
        assert repack(shard) is shard and shard.layout == CHECKPOINT_LAYOUT
        x = torch.randn(5, HIDDEN, generator=gen)
        ids, w = routing(gen, 5, 2)
        assert torch.equal(cpu_int4_moe(x, ids, w, shard), reference_moe(x, ids, w, shard))
