"""Agent training pieces: the shared-prefix loss equals the plain full-sequence loss, and the QAT fake
quantization is exactly what `k2serve quantize` stores, with a straight-through gradient."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from k2serve.worker.agent_model.corpus import Sample
from k2serve.worker.agent_model.train import (
    FakeInt4, agent_config, batch_loss, disable_qat, enable_qat, expert_modules, hf_model, save_bf16, save_int4,
)
from k2serve.worker.loader import load_weights
from k2serve.worker.quant.int4 import dequantize


def _samples(rng: random.Random, prefix: list[int]) -> list[Sample]:
    out = []
    for n in (9, 14, 5):
        tail = [rng.randrange(512) for _ in range(n)]
        labels = [False] * len(prefix) + [rng.random() < 0.6 for _ in range(n)]
        labels[len(prefix)] = True  # the first suffix token is predicted from the prefix's last position
        out.append(Sample(prefix + tail, labels))
    return out


def test_shared_prefix_loss_equals_full_sequence_loss() -> None:
    rng = random.Random(0)
    model = hf_model(agent_config(), seed=1)
    prefix = [rng.randrange(512) for _ in range(11)]
    batch = _samples(rng, prefix)
    shared = batch_loss(model, torch.tensor(prefix), batch)
    total, count = torch.tensor(0.0), 0
    for s in batch:
        logits = model(torch.tensor(s.ids)[None]).logits[0]  # [T, V]
        for t in range(1, len(s.ids)):
            if s.labels[t]:
                total = total + torch.nn.functional.cross_entropy(logits[t - 1], torch.tensor(s.ids[t]))
                count += 1
    torch.testing.assert_close(shared, total / count, rtol=1e-4, atol=1e-5)


def test_fake_quant_is_what_the_int4_checkpoint_holds(tmp_path: Path) -> None:
    config = agent_config()
    model = hf_model(config, seed=2)
    enable_qat(model)
    experts = expert_modules(model)[0]
    seen = experts.gate_up_proj.detach().clone()  # [E, 2I, H] as the QAT forward uses it
    disable_qat(model)
    save_bf16(model, tmp_path / "bf16", config)
    save_int4(tmp_path / "bf16", tmp_path / "int4")
    shard = load_weights(tmp_path / "int4", dtype=torch.float32).experts[config.moe_layers[0]]
    torch.testing.assert_close(dequantize(shard.w13, shard.w13_scale), seen, rtol=0, atol=0)


def test_fake_quant_gradient_is_straight_through() -> None:
    w = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = FakeInt4()(w)
    assert not torch.equal(q, w) and (q - w).abs().max() < w.abs().max() / 7
    q.backward(torch.arange(q.numel(), dtype=torch.float32).view_as(q))
    torch.testing.assert_close(w.grad, torch.arange(q.numel(), dtype=torch.float32).view_as(q))
