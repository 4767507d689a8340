"""`builtin:tiny-k2`: a small model of exactly K2 Thinking's architecture and checkpoint layout (MLA, YaRN, sigmoid
noaux_tc routing, shared expert, INT4 pack-quantized routed experts, sharded safetensors, tiktoken tokenizer with
K2's special tokens), built deterministically from a seed into a cache folder on first use. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from k2serve.config import CACHE_ENV
from k2serve.worker.checkpoint import ShardedWriter, checkpoint_shapes
from k2serve.worker.model.config import K2Config
from k2serve.worker.quantize import compress_tensor, k2_quant_config

TINY_SEED = 0
TINY_MAX_SHARD_BYTES = 1 << 20  # ~5 shards for the INT4 tiny model: the loader's multi-file paths get exercised
# Part of the cache key: bump it whenever what `ensure_tiny` writes changes for the same config.
TINY_BUILD_VERSION = 1
_TINY_BOS, _TINY_EOS = 256, 257  # [BOS], [EOS] of `write_tiny_tokenizer`'s vocabulary (256 bytes, then specials)


def tiny_config(*, n_routed_experts: int = 16, n_group: int = 1, topk_group: int = 1, num_experts_per_tok: int = 4,
                **overrides: Any) -> K2Config:
    """K2 Thinking's config scaled down. YaRN keeps K2's factor 64 and betas; the original context shrinks from
    4096 to 256 so that 16384 positions span the same scaling range."""
    fields: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "n_routed_experts": n_routed_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "n_shared_experts": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "max_position_embeddings": 16384,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 256,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": _TINY_BOS,
        "eos_token_id": _TINY_EOS,
    }
    fields.update(overrides)
    return K2Config.model_validate(fields)


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scales that keep activations O(1) through the layers and logits spread (not degenerate): unit-variance
    embeddings, 1/sqrt(fan_in) projections, norms near 1, a correction bias large enough to change some expert
    choices (so routing is exercised) but not all."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * x
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith(".bias"):
        return 0.02 * x
    if name == "model.embed_tokens.weight":
        return x
    return x / math.sqrt(shape[-1])


def write_random_checkpoint(
    directory: str | Path,
    config: K2Config,
    seed: int = TINY_SEED,
    quantize: bool = False,
    max_shard_bytes: int = TINY_MAX_SHARD_BYTES,
) -> Path:
    """Deterministic random weights in the HF layout: bf16 tensors (the correction bias float32, as K2 keeps it),
    routed experts INT4 pack-quantized from those same bf16 weights when `quantize`. The numbers drawn depend only
    on (config, seed): the quantized and the bf16 checkpoint of one seed hold the same model, whatever the shard
    size. Writes config.json and the sharded safetensors with their index; no tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if quantize:
        config = config.model_copy(update={"quantization": k2_quant_config()})
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedWriter(directory, max_shard_bytes)
    for name, shape in checkpoint_shapes(config).items():
        t = _random_tensor(name, shape, gen)
        t = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        tensors = compress_tensor(name, t, config.quantization) if config.quantization is not None else {name: t}
        for out_name, out in tensors.items():
            writer.add(out_name, out)
    writer.close()
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return directory


def _cache_key() -> str:
    spec = {"config": tiny_config().to_hf_dict(), "seed": TINY_SEED, "version": TINY_BUILD_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """The `builtin:tiny-k2` folder under `cache_dir`, else `$K2SERVE_CACHE`, else `~/.cache/k2serve`; built on
    first use. Built in a private temp folder and renamed into place, so a reader never sees a half-built
    model and two processes racing to build it both end up with the same complete folder."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "k2serve")
    final = root / f"tiny-k2-{_cache_key()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        from k2serve.worker.tokenizer import write_tiny_tokenizer

        write_random_checkpoint(tmp, tiny_config(), seed=TINY_SEED, quantize=True)
        write_tiny_tokenizer(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
