"""`builtin:tiny-k2`: a small model of exactly K2 Thinking's architecture and checkpoint layout (MLA, YaRN, sigmoid
noaux_tc routing, shared expert, INT4 pack-quantized routed experts, sharded safetensors, tiktoken tokenizer with
K2's special tokens), built deterministically from a seed into a cache folder on first use. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from k2serve.k2format.model_config import K2Config
from k2serve.k2format.tiny import TINY_BUILD_VERSION, build_once, cache_root, tiny_config
from k2serve.k2format.tokenizer import write_tiny_tokenizer
from k2serve.worker.checkpoint import ShardedWriter, checkpoint_shapes
from k2serve.worker.quantize import compress_tensor, k2_quant_config

TINY_SEED = 0
TINY_MAX_SHARD_BYTES = 1 << 20  # ~5 shards for the INT4 tiny model: the loader's multi-file paths get exercised


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


def _write_tiny(directory: Path) -> None:
    write_random_checkpoint(directory, tiny_config(), seed=TINY_SEED, quantize=True)
    write_tiny_tokenizer(directory)


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """The `builtin:tiny-k2` checkpoint (weights, config, tokenizer) under the cache root; built on first use."""
    return build_once(cache_root(cache_dir) / f"tiny-k2-{_cache_key()}", _write_tiny)
