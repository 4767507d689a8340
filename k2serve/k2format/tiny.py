"""`builtin:tiny-k2` as the router sees it: its config (K2 Thinking's architecture scaled down) and tokenizer,
written once into a cache folder. The worker plane builds the same model's weights (`k2serve.worker.tiny`) with
`build_once` too, into a folder of its own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2serve.config import CACHE_ENV
from k2serve.k2format.model_config import K2Config
from k2serve.k2format.tokenizer import write_tiny_tokenizer

# Part of the cache keys: bump it whenever what the tiny builders write changes for the same config.
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


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else `$K2SERVE_CACHE`, else `~/.cache/k2serve`."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "k2serve")


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp)` on first use. Built in a private temp folder and renamed into place, so a
    reader never sees a half-built folder and two processes racing to build it both end up with the same
    complete folder."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_format(directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps(tiny_config().to_hf_dict(), indent=2) + "\n")
    write_tiny_tokenizer(directory)


def ensure_tiny_format(cache_dir: Path | None = None) -> Path:
    """The `builtin:tiny-k2` config and tokenizer (no weights) under the cache root; written on first use."""
    spec = {"config": tiny_config().to_hf_dict(), "version": TINY_BUILD_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return build_once(cache_root(cache_dir) / f"tiny-k2-format-{key}", _write_format)
