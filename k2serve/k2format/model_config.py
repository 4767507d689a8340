"""The model's config.json (Kimi K2 / DeepSeek-V3 architecture), validated.

Accepts `model_type` `kimi_k2` or `deepseek_v3`, and rope settings either as K2 ships them (`rope_theta` +
`rope_scaling` with `type`) or as transformers 5 writes them (`rope_parameters` with `rope_type` and
`rope_theta` inside). The compressed-tensors `quantization_config` is parsed into `QuantConfig`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


class RopeConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rope_type: Literal["default", "yarn"] = "default"
    rope_theta: float = Field(10000.0, gt=0)
    factor: float = Field(1.0, gt=0)
    original_max_position_embeddings: int | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True


class QuantConfig(BaseModel):
    """compressed-tensors `pack-quantized`, W4A16, symmetric, grouped (K2 Thinking's scheme)."""

    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=list)

    def is_quantized(self, module: str) -> bool:
        """Whether the Linear named `module` (e.g. `model.layers.3.mlp.experts.7.up_proj`) is stored packed."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return False
            elif module == pattern or module.endswith("." + pattern):
                return False
        return True

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> "QuantConfig":
        method, fmt = qc.get("quant_method"), qc.get("format")
        if method != "compressed-tensors" or fmt != "pack-quantized":
            raise ValueError(f"unsupported quantization_config: quant_method={method!r} format={fmt!r} "
                             "(supported: compressed-tensors pack-quantized)")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(f"quantization_config must have exactly one config group, found {len(groups)}")
        w = next(iter(groups.values())).get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type", "int") != "int" or w.get("strategy") != "group":
            raise ValueError(f"unsupported weight scheme {w} (supported: 4-bit int, group strategy)")
        if not w.get("symmetric", True):
            raise ValueError("asymmetric INT4 (zero points) is not supported: K2 ships symmetric weights")
        return cls(num_bits=4, group_size=int(w.get("group_size", 32)), symmetric=True, ignore=qc.get("ignore") or [])

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` shaped like K2 Thinking's."""
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": self.num_bits, "type": "int", "symmetric": True,
                            "group_size": self.group_size, "strategy": "group", "dynamic": False,
                            "actorder": None, "block_structure": None, "observer": "minmax",
                            "observer_kwargs": {}}}},
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
        }


class K2Config(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_type: str = "kimi_k2"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    first_k_dense_replace: int = Field(0, ge=0)
    moe_layer_freq: int = Field(1, ge=1)
    n_routed_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    n_shared_experts: int = Field(0, ge=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = None
    q_lora_rank: int | None = Field(None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    n_group: int = Field(1, ge=1)
    topk_group: int = Field(1, ge=1)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = Field(1.0, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    rope: RopeConfig = Field(default_factory=RopeConfig)
    rope_interleave: bool = True
    rms_norm_eps: float = Field(1e-6, gt=0)
    hidden_act: Literal["silu"] = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization: QuantConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        rope: dict[str, Any] = {}
        if isinstance(data.get("rope_parameters"), dict):  # transformers 5
            rope.update(data["rope_parameters"])
        else:  # K2 as shipped
            rope.update(data.get("rope_scaling") or {})
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if data.get("rope_theta") is not None:
                rope["rope_theta"] = data["rope_theta"]
        data["rope"] = rope
        qc = data.get("quantization_config")
        if isinstance(qc, dict) and not isinstance(data.get("quantization"), QuantConfig):
            data["quantization"] = QuantConfig.from_hf(qc)
        return data

    @model_validator(mode="after")
    def _check(self) -> "K2Config":
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} > n_routed_experts {self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} does not divide n_routed_experts {self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group {self.topk_group} > n_group {self.n_group}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace {self.first_k_dense_replace} > num_hidden_layers")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        if self.rope.rope_type == "yarn" and self.rope.original_max_position_embeddings is None:
            raise ValueError("yarn rope scaling needs original_max_position_embeddings")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per token and layer, MLA caches only the compressed latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dir(cls, path: str | Path) -> "K2Config":
        f = Path(path) / "config.json"
        try:
            data = json.loads(f.read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{f}: no config.json in the model directory") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        try:
            return cls.model_validate(data)
        except Exception as e:
            raise ValueError(f"{f}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as K2 ships it (rope_theta + rope_scaling), readable by transformers 5 too."""
        d = self.model_dump(exclude={"rope", "quantization"})
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["rope_theta"] = self.rope.rope_theta
        if self.rope.rope_type != "default":
            d["rope_scaling"] = {"type": self.rope.rope_type,
                                 **self.rope.model_dump(exclude={"rope_type", "rope_theta"}, exclude_none=True)}
        if self.quantization is not None:
            d["quantization_config"] = self.quantization.to_hf()
        return d
