"""k2serve's K2 model against transformers' DeepseekV3ForCausalLM on the same random bf16 safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hf_reference import load_hf_fp32, random_hf_model, save_bf16, tiny_hf_config

from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights
from k2serve.worker.model.batch import ForwardBatch, LatentKVCache, SeqSlice
from k2serve.worker.model.k2 import K2Model

CASES = [  # (seed, experts, n_group, topk_group)
    (1, 16, 1, 1),
    (2, 8, 1, 1),
    (3, 32, 4, 2),  # group-limited routing: only the best 2 of 4 groups may be chosen
]


def prefill_logits(model: K2Model, ids: torch.Tensor) -> torch.Tensor:
    T = ids.shape[0]
    kv = LatentKVCache(model.config, -(-T // 16), 16, model.dtype, model.device)
    batch = ForwardBatch(ids, torch.arange(T), [SeqSlice(0, T, 0, torch.arange(T))], torch.arange(T))
    return model.forward(batch, kv)


@pytest.mark.parametrize("seed,experts,n_group,topk_group", CASES)
def test_logits_and_greedy_tokens_match_transformers(tmp_path: Path, seed: int, experts: int, n_group: int,
                                                     topk_group: int) -> None:
    hf_config = tiny_hf_config(seed, experts, n_group, topk_group)
    save_bf16(random_hf_model(hf_config, seed), tmp_path)
    reference = load_hf_fp32(tmp_path, hf_config)
    weights = load_weights(tmp_path, dtype=torch.float32)
    model = K2Model(weights.config, weights.dense, weights.experts)

    ids = torch.randint(3, hf_config.vocab_size, (41,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]  # [T, V]
    ours = prefill_logits(model, ids)
    rel = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4, f"max relative logit error {rel:.2e}"

    with torch.no_grad():
        hf_tokens = reference.generate(ids[None], max_new_tokens=64, do_sample=False, min_new_tokens=64,
                                       eos_token_id=None, pad_token_id=0)[0, ids.shape[0]:].tolist()
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=16), eos_token_ids=[])
    engine.add_request("r", ids.tolist(), SamplingParams(temperature=0.0, max_tokens=64))
    tokens: list[int] = []
    while engine.has_work():
        tokens += [e.token for e in engine.step()]
    assert len(hf_tokens) == 64
    assert tokens == hf_tokens


def test_int4_model_equals_reference_on_dequantized_weights(tmp_path: Path) -> None:
    """A `k2serve quantize`d checkpoint run by k2serve (packed INT4 experts) against transformers run on the
    same experts dequantized: only the quantization itself may differ, and it is the same on both sides. The
    experts run through the float32 reference (the CPU int4 GEMM's bf16 activations are checked against it in
    test_cpu_int4.py)."""
    from k2serve.worker.model.ffn import LocalExperts
    from k2serve.worker.quant.int4 import dequantize
    from k2serve.worker.quant.moe import reference_moe
    from k2serve.worker.quantize import quantize_checkpoint

    hf_config = tiny_hf_config(4, 16)
    save_bf16(random_hf_model(hf_config, 4), tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "int4")
    weights = load_weights(tmp_path / "int4", dtype=torch.float32)
    assert all(shard.quantized for shard in weights.experts.values())
    model = K2Model(weights.config, weights.dense, LocalExperts(weights.experts, reference_moe))

    reference = load_hf_fp32(tmp_path / "bf16", hf_config)
    with torch.no_grad():
        for layer, shard in weights.experts.items():
            experts = reference.model.layers[layer].mlp.experts
            experts.gate_up_proj.copy_(dequantize(shard.w13, shard.w13_scale))
            experts.down_proj.copy_(dequantize(shard.w2, shard.w2_scale))
    ids = torch.randint(3, hf_config.vocab_size, (29,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    ours = prefill_logits(model, ids)
    rel = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4, f"max relative logit error {rel:.2e}"
