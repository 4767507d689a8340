"""KV capacity planned from free memory, prefill chunks from a byte budget, and the refusal of a request that
cannot fit before it starts."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_weights

from k2serve.worker.engine import settings as engine_settings
from k2serve.worker.engine.capacity import (
    KV_MEMORY_FRACTION,
    available_bytes,
    plan_kv_blocks,
    prefill_bytes,
    prefill_bytes_per_token,
    prefill_chunk_tokens,
)
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.model.batch import LatentKVCache
from k2serve.worker.model.k2 import K2Model


def test_kv_blocks_fill_the_free_memory_after_the_prefill_reserve() -> None:
    config = tiny_weights().config
    block = LatentKVCache.bytes_per_token(config, torch.float32) * 16
    blocks = plan_kv_blocks(config, torch.float32, 16, 1000 * block + 4096, 4096)
    assert blocks == int(1000 * block * KV_MEMORY_FRACTION) // block
    with pytest.raises(ValueError, match="no KV block fits"):
        plan_kv_blocks(config, torch.float32, 16, 4096 + block, 4096)


def test_prefill_chunk_fits_its_budget() -> None:
    config = tiny_weights().config
    for budget in (16 << 20, 64 << 20, 1 << 30):
        tokens = prefill_chunk_tokens(config, torch.float32, budget)
        assert prefill_bytes(config, torch.float32, tokens) <= budget < prefill_bytes(config, torch.float32, tokens + 1)
    assert prefill_bytes_per_token(config, torch.bfloat16) == prefill_bytes_per_token(config, torch.float32)
    with pytest.raises(ValueError, match="holds no token"):
        prefill_chunk_tokens(config, torch.float32, 1 << 20)


def test_available_memory_is_positive_and_below_the_total() -> None:
    free = available_bytes(torch.device("cpu"))
    assert 0 < free <= torch.iinfo(torch.int64).max


def test_planned_engine_refuses_what_its_cache_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    w = tiny_weights()
    model = K2Model(w.config, w.dense, w.experts)
    block = LatentKVCache.bytes_per_token(w.config, model.dtype) * 16
    reserve = prefill_bytes(w.config, model.dtype, 64)
    monkeypatch.setattr(engine_settings, "available_bytes", lambda device: reserve + 40 * block)
    engine = Engine(model, EngineConfig(num_blocks=0, block_size=16, prefill_memory_bytes=reserve), eos_token_ids=[])
    assert engine.cfg.max_batch_tokens == 64
    assert engine.cfg.num_blocks == int(40 * block * KV_MEMORY_FRACTION) // block == 36
    assert engine.kv.data.shape[1] == 36 * 16
    with pytest.raises(ValueError, match=r"exceed the KV cache \(576 tokens\)"):
        engine.add_request("long", list(range(500)), SamplingParams(max_tokens=100))
    assert not engine.has_work()
    engine.add_request("fits", list(range(200)), SamplingParams(temperature=0.0, max_tokens=4))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert steps >= 200 // 64 + 4  # the prompt went in chunks of at most 64 tokens
