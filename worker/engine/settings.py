"""The engine's settings, and their memory-derived sizes resolved for a model on a device."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from k2serve.config import PoolConfig, ServingConfig
from k2serve.k2format.model_config import K2Config
from k2serve.worker.engine.capacity import available_bytes, plan_kv_blocks, prefill_bytes, prefill_chunk_tokens

DEFAULT_CPU_KV_BLOCKS = 2048  # per rank, when the pool config leaves kv_blocks unset


@dataclass
class EngineConfig:
    num_blocks: int = DEFAULT_CPU_KV_BLOCKS  # 0: as many as fit the memory free once the model is loaded (engine/capacity.py)
    block_size: int = 16
    max_batch_tokens: int = 2048  # chunked-prefill budget of one step
    prefill_memory_bytes: int | None = None  # caps max_batch_tokens so a step's activations fit these bytes
    max_running: int = 256
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    deterministic: bool = False  # the default for requests that don't say
    lockstep: bool = False  # one forward per step whatever the requests ask (expert-parallel ranks)
    dtype: str = "auto"  # the serving config's model.dtype: weights, activations and KV cache (model/dtypes.py)

    @classmethod
    def for_pool(cls, pool: PoolConfig, config: ServingConfig) -> "EngineConfig":
        """The engine of one rank (or in-process group) of `pool`: the one derivation from the serving config."""
        return cls(num_blocks=pool.kv_blocks or DEFAULT_CPU_KV_BLOCKS, block_size=pool.block_size,
                   max_batch_tokens=pool.max_batch_tokens, max_running=pool.max_running,
                   max_model_len=config.model.max_context, deterministic=config.deterministic,
                   dtype=config.model.dtype)


def plan(config: EngineConfig, model: K2Config, dtype: torch.dtype, device: torch.device) -> EngineConfig:
    """`config` with its memory-derived sizes resolved: the prefill chunk from `prefill_memory_bytes`, and with
    num_blocks 0 the KV cache from the memory free besides that chunk's."""
    chunk = config.max_batch_tokens
    if config.prefill_memory_bytes is not None:
        chunk = min(chunk, prefill_chunk_tokens(model, dtype, config.prefill_memory_bytes))
    reserve = config.prefill_memory_bytes or prefill_bytes(model, dtype, chunk)
    blocks = config.num_blocks or plan_kv_blocks(model, dtype, config.block_size, available_bytes(device), reserve)
    return replace(config, max_batch_tokens=chunk, num_blocks=blocks)
