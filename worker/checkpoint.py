"""The Hugging Face checkpoint layout of the K2 / DeepSeek-V3 architecture: which tensors a config implies
(names and shapes as transformers 5's `DeepseekV3ForCausalLM.save_pretrained` writes them), the weight map of a
directory, and a writer that streams tensors into size-bounded safetensors shards with an index."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from k2serve.k2format.model_config import K2Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
# The routed experts' Linear modules; only these are ever INT4 in K2 Thinking.
EXPERT_MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
DEFAULT_MAX_SHARD_BYTES = 4 << 30


def expert_module(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}"


def expert_shape(config: K2Config, proj: str) -> tuple[int, int]:
    """[out, in] of one routed expert's projection."""
    h, i = config.hidden_size, config.moe_intermediate_size
    return (h, i) if proj == "down_proj" else (i, h)


def packed_shapes(shape: tuple[int, int], group_size: int) -> dict[str, tuple[int, ...]]:
    """The pack-quantized tensors replacing a Linear's `weight` [out, in]."""
    out_f, in_f = shape
    return {"weight_packed": (out_f, in_f // 8), "weight_scale": (out_f, in_f // group_size), "weight_shape": (2,)}


def dense_shapes(config: K2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor except the routed experts, by HF name -> shape. lm_head is absent when embeddings are tied."""
    c = config
    h, heads = c.hidden_size, c.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if c.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (heads * c.qk_head_dim, h)
        else:
            shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (heads * c.qk_head_dim, c.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c.kv_cache_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, heads * c.v_head_dim)
        if c.attention_bias:  # transformers puts biases on exactly these three
            if c.q_lora_rank is not None:
                shapes[a + "q_a_proj.bias"] = (c.q_lora_rank,)
            shapes[a + "kv_a_proj_with_mqa.bias"] = (c.kv_cache_dim,)
            shapes[a + "o_proj.bias"] = (h,)
        m = p + "mlp."
        if not c.is_moe_layer(layer):
            shapes.update(_mlp_shapes(m, h, c.intermediate_size))
            continue
        shapes[m + "gate.weight"] = (c.n_routed_experts, h)
        shapes[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
        if c.n_shared_experts:
            shapes.update(_mlp_shapes(m + "shared_experts.", h, c.moe_intermediate_size * c.n_shared_experts))
    return shapes


def checkpoint_shapes(config: K2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the unquantized checkpoint, routed experts included, in natural order (layer 2 before
    layer 10), which is the order the tiny builder draws random numbers in."""
    shapes = dense_shapes(config)
    for layer in config.moe_layers:
        for e in range(config.n_routed_experts):
            for proj in EXPERT_PROJS:
                shapes[expert_module(layer, e, proj) + ".weight"] = expert_shape(config, proj)
    return dict(sorted(shapes.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part) for part in name.split(".")]


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def read_weight_map(model_dir: Path) -> tuple[dict[str, str], Path]:
    """tensor name -> shard file name, and the file that said so (the index, or the single safetensors file)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        return {str(k): str(v) for k, v in weight_map.items()}, index
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with open_shard(single, single) as shard:
            return {name: SINGLE_FILE for name in shard.keys()}, single
    raise FileNotFoundError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE} (not a Hugging Face model directory?)")


@dataclass
class ShardReader:
    """One open safetensors file; every failure names the file and the tensor."""

    path: Path
    listed_in: Path
    handle: Any

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def _check(self, name: str) -> None:
        if name not in self.handle.keys():
            raise ValueError(f"{self.path}: tensor {name!r} is not in this shard (but {self.listed_in} says it is)")

    def shape(self, name: str) -> tuple[int, ...]:
        """Read from the header only: no tensor data is touched."""
        self._check(name)
        return tuple(self.handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        self._check(name)
        try:
            return self.handle.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot read tensor {name!r} ({e})") from e


@contextmanager
def open_shard(path: Path, listed_in: Path) -> Iterator[ShardReader]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in {listed_in} is missing")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors checks the header and that the data covers it: truncation lands here
        raise ValueError(f"{path}: corrupted safetensors file ({e})") from e
    with handle:
        yield ShardReader(path, listed_in, handle)


@dataclass
class ShardedWriter:
    """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` files of at most `max_shard_bytes` each (a tensor
    larger than that gets a shard of its own), then writes `model.safetensors.index.json`. Only the current
    shard is held in memory, so a trillion-parameter checkpoint converts in bounded memory."""

    directory: Path
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list[list[str]] = field(default_factory=list)
    _total_bytes: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Own the storage: a view into a larger tensor would make safetensors write (or refuse) the whole base.
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        self._shards.append(sorted(self._pending))
        save_file(self._pending, str(self._tmp_name(len(self._shards))), metadata={"format": "pt"})
        self._pending, self._pending_bytes = {}, 0

    def _tmp_name(self, i: int) -> Path:
        return self.directory / f".model-{i:05d}.safetensors.partial"

    def close(self) -> dict[str, str]:
        """Flush, name the shards `-of-N` now that N is known, write the index; -> the weight map."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(i), self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
