"""How much an engine may hold, planned from memory: KV-cache blocks from the memory free once the weights are
loaded, and the prefill chunk (tokens of one step) from a byte budget for its activations. A request that cannot
fit the planned cache is refused before it starts (`Engine.prepare`), not killed by the kernel mid-prefill."""

from __future__ import annotations

from pathlib import Path

import torch

from k2serve.worker.model.attention_tiles import TILE_BYTES
from k2serve.worker.model.batch import LatentKVCache
from k2serve.k2format.model_config import K2Config

KV_MEMORY_FRACTION = 0.9  # of what is free after the prefill reserve: the rest absorbs allocator slack
# Live bytes of a prefill step per token, over the estimate of its named tensors (`prefill_bytes_per_token`):
# temporaries and allocator slack. Measured on tiny-k2 (bench/long_context.py, one chunk of 1K-4K tokens).
PREFILL_SLACK = 4


def proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now), VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take: free GPU memory, or on CPU MemAvailable bounded by the cgroup's limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    free = int(fields["MemAvailable"].split()[0]) * 1024
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.exists() and used.exists() and limit.read_text().strip() != "max":
        free = min(free, int(limit.read_text()) - int(used.read_text()))
    return free


def prefill_bytes_per_token(config: K2Config, dtype: torch.dtype) -> int:
    """The named activations one prefill token keeps alive in a layer (hidden state, residual and normed copy;
    queries in head and latent space, attended latents and outputs; the widest MLP's rows), times PREFILL_SLACK.
    The attention's tiles are bounded apart from this (TILE_BYTES)."""
    c = config
    heads = c.num_attention_heads
    attention = heads * (c.qk_head_dim + 2 * (c.kv_cache_dim) + c.kv_lora_rank + c.v_head_dim)
    moe = c.num_experts_per_tok * 3 * c.moe_intermediate_size + (c.n_shared_experts or 0) * 3 * c.moe_intermediate_size
    mlp = max(3 * c.intermediate_size, moe + c.n_routed_experts)
    width = 3 * c.hidden_size + (c.q_lora_rank or 0) + attention + mlp
    return PREFILL_SLACK * width * max(4, torch.empty(0, dtype=dtype).element_size())


def prefill_chunk_tokens(config: K2Config, dtype: torch.dtype, budget_bytes: int) -> int:
    """Tokens of one prefill step whose activations (and one attention tile) fit `budget_bytes`."""
    tokens = (budget_bytes - 2 * TILE_BYTES) // prefill_bytes_per_token(config, dtype)
    if tokens < 1:
        raise ValueError(f"a prefill budget of {budget_bytes} bytes holds no token of this model")
    return int(tokens)


def prefill_bytes(config: K2Config, dtype: torch.dtype, tokens: int) -> int:
    """The working memory of a prefill step of `tokens` (the inverse of `prefill_chunk_tokens`)."""
    return tokens * prefill_bytes_per_token(config, dtype) + 2 * TILE_BYTES


def plan_kv_blocks(config: K2Config, dtype: torch.dtype, block_size: int, free_bytes: int, reserve_bytes: int) -> int:
    """KV blocks that fit KV_MEMORY_FRACTION of `free_bytes` after `reserve_bytes` (the prefill's working memory)."""
    block_bytes = LatentKVCache.bytes_per_token(config, dtype) * block_size
    blocks = int((free_bytes - reserve_bytes) * KV_MEMORY_FRACTION) // block_bytes
    if blocks < 1:
        raise ValueError(f"no KV block fits: {free_bytes} bytes free, {reserve_bytes} reserved for prefill, "
                         f"{block_bytes} per block")
    return blocks
