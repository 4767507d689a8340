"""Capacity planning: how a K2-architecture model lands on the GPUs of one expert-parallel group, before any pod
is scheduled. Pure arithmetic on config.json values (no torch), shared by `k2serve plan` and the operator's
`Schedulable` gate.

Layout it models (the worker plane's): every rank of a group holds 1/EP of the routed experts of each MoE layer
and a full copy of everything else (MLA attention, the shared expert, the dense layers, router gates, norms,
embeddings, lm_head); attention is data-parallel, so each rank keeps the latent KV cache of its own sequences
and one sequence's cache lives on one rank. MLA caches, per token and layer, the compressed latent
(`kv_lora_rank`) plus the decoupled RoPE key (`qk_rope_head_dim`), not per-head keys and values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

Quantization = Literal["int4", "bf16"]
GIB = 1 << 30
MIB = 1 << 20
# What nvidia-smi reports as total memory of each card.
GPU_MEMORY: dict[str, int] = {
    "H100-80GB": 81559 * MIB,
    "H200-141GB": 143771 * MIB,
    "A100-80GB": 81920 * MIB,
    "B200-180GB": 183359 * MIB,
}
# Node label `nvidia.com/gpu.product` (NVIDIA GPU feature discovery) -> the card above; first match wins.
_PRODUCT_PATTERNS = (("H200", "H200-141GB"), ("H100", "H100-80GB"), ("A100.*80GB", "A100-80GB"), ("B200", "B200-180GB"))
# CUDA context, NCCL buffers, the allocator's fragmentation and kernel workspaces: kept free on every device.
DEFAULT_RESERVE_BYTES = 4 * GIB
INT4_GROUP_SIZE = 32


def gpu_for_product(product: str) -> str | None:
    """`NVIDIA-H100-80GB-HBM3` -> `H100-80GB`; None for a card not in GPU_MEMORY."""
    return next((gpu for pattern, gpu in _PRODUCT_PATTERNS if re.search(pattern, product, re.IGNORECASE)), None)


@dataclass(frozen=True)
class ModelShape:
    """The config.json values that decide memory (DeepSeek-V3 / Kimi K2 names)."""

    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        try:
            return cls(**{name: config[name] for name in cls.__dataclass_fields__ if name != "tie_word_embeddings"},
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}, needed for capacity planning") from None

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def expert_params(self) -> int:
        """One routed expert: gate, up [moe_inter, hidden] and down [hidden, moe_inter]."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def attention_params(self) -> int:
        """One MLA layer, its norms included."""
        h, heads = self.hidden_size, self.num_attention_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * qk
        else:
            q = h * heads * qk
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + heads * self.v_head_dim * h + 2 * h  # + o_proj + input/post-attention norms

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes


def load_config(name_or_path: str) -> dict[str, Any]:
    """A shipped config (`kimi-k2-thinking`, `tiny-k2`) or a config.json / model folder on disk."""
    from pathlib import Path

    shipped = resources.files("k2serve.model_configs") / f"{name_or_path}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    path = Path(name_or_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path}: neither a shipped model config ({', '.join(shipped_configs())}) "
                                "nor a config.json or model folder")
    return json.loads(path.read_text())


def shipped_configs() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("k2serve.model_configs").iterdir()
                  if p.name.endswith(".json"))


@dataclass(frozen=True)
class WeightBytes:
    routed_experts: int  # all of them, over the whole model
    replicated: int  # held by every rank

    @property
    def total(self) -> int:
        return self.routed_experts + self.replicated


def weight_bytes(shape: ModelShape, quantization: Quantization, dtype_bytes: int = 2) -> WeightBytes:
    """Bytes of the weights as stored: INT4 packs routed experts as int32 words of eight nibbles plus one bf16
    scale per group of 32 inputs and a 2-element int64 `weight_shape` per Linear (K2's compressed-tensors
    layout); everything else is `dtype_bytes` wide. Router gates are dtype-wide with an fp32 correction bias."""
    expert_params = shape.expert_params()
    if quantization == "int4":
        per_expert = expert_params // 2 + expert_params // INT4_GROUP_SIZE * 2 + 3 * 2 * 8
    else:
        per_expert = expert_params * dtype_bytes
    h = shape.hidden_size
    shared = shape.n_shared_experts * shape.expert_params()
    gate = shape.n_routed_experts * h
    moe_layer = shared + gate
    dense_layer = 3 * h * shape.intermediate_size
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    params = (shape.num_hidden_layers * shape.attention_params() + shape.moe_layers * moe_layer
              + shape.first_k_dense_replace * dense_layer + embeddings + h)  # + the final norm
    replicated = params * dtype_bytes + shape.moe_layers * shape.n_routed_experts * 4
    return WeightBytes(routed_experts=shape.moe_layers * shape.n_routed_experts * per_expert, replicated=replicated)


def activation_bytes(shape: ModelShape, max_batch_tokens: int, max_running: int, dtype_bytes: int = 2) -> int:
    """Peak working memory of one engine step of `max_batch_tokens` tokens, counted as if every buffer were live
    at once: the residual stream and its normed copies, the per-head queries/keys/values of a chunk, the dense
    MLP's gate and up projections, the MoE dispatch (each token's hidden row and expert intermediate once per
    chosen expert, out and back) and fp32 logits of every running sequence."""
    h = shape.hidden_size
    heads = shape.num_attention_heads * (shape.qk_nope_head_dim + shape.qk_rope_head_dim + shape.v_head_dim)
    per_token = 4 * h + heads + 2 * shape.intermediate_size
    per_token += shape.num_experts_per_tok * (2 * h + 2 * shape.moe_intermediate_size)
    return max_batch_tokens * per_token * dtype_bytes + max_running * shape.vocab_size * 4


@dataclass(frozen=True)
class PlanRequest:
    shape: ModelShape
    quantization: Quantization
    device_memory: int  # bytes of one GPU (or, for CPU pools, of one worker pod)
    expert_parallel: int
    max_context: int
    max_batch_tokens: int = 8192
    max_running: int = 256
    dtype_bytes: int = 2  # activations, KV cache and unquantized weights
    reserve: int = DEFAULT_RESERVE_BYTES


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    expert_bytes: int  # per device
    replicated_bytes: int  # per device
    activation_bytes: int
    reserve_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int  # per device, what is left for the cache (negative: does not fit)
    kv_tokens: int  # per device
    sequences_per_device: int  # of max_context tokens each
    checkpoint_bytes: int  # the whole model as stored

    @property
    def fixed_bytes(self) -> int:
        """Per device, before any KV cache."""
        return self.expert_bytes + self.replicated_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def needed_bytes(self) -> int:
        """Per device, with the cache of one sequence of max_context tokens."""
        return self.fixed_bytes + self.kv_bytes_per_token * self.request.max_context

    @property
    def fits(self) -> bool:
        return self.sequences_per_device >= 1

    @property
    def group_sequences(self) -> int:
        """Sequences of max_context tokens one group holds at once (each lives on one rank)."""
        return min(self.sequences_per_device * self.request.expert_parallel, self.request.max_running)

    def verdict(self) -> str:
        r = self.request
        head = (f"EP {r.expert_parallel} on {fmt_bytes(r.device_memory)} devices: per device "
                f"{fmt_bytes(self.fixed_bytes)} weights+activations+reserve "
                f"(experts {fmt_bytes(self.expert_bytes)}, replicated {fmt_bytes(self.replicated_bytes)})")
        if self.fits:
            return (f"{head}, KV cache {fmt_bytes(self.kv_bytes)} = {self.kv_tokens} tokens, "
                    f"{self.group_sequences} sequences of {r.max_context} tokens per group")
        return (f"{head}; one {r.max_context}-token sequence needs {fmt_bytes(self.needed_bytes)} per device but "
                f"only {fmt_bytes(r.device_memory)} is available")


def plan(request: PlanRequest) -> Plan:
    r = request
    shape = r.shape
    if r.expert_parallel < 1 or shape.n_routed_experts % r.expert_parallel:
        raise ValueError(f"expert parallelism {r.expert_parallel} must divide {shape.n_routed_experts} experts")
    weights = weight_bytes(shape, r.quantization, r.dtype_bytes)
    experts = weights.routed_experts // r.expert_parallel
    acts = activation_bytes(shape, r.max_batch_tokens, r.max_running, r.dtype_bytes)
    per_token = shape.kv_bytes_per_token(r.dtype_bytes)
    kv = r.device_memory - experts - weights.replicated - acts - r.reserve
    tokens = max(0, kv) // per_token
    return Plan(request=r, expert_bytes=experts, replicated_bytes=weights.replicated, activation_bytes=acts,
                reserve_bytes=r.reserve, kv_bytes_per_token=per_token, kv_bytes=kv, kv_tokens=tokens,
                sequences_per_device=tokens // r.max_context,
                checkpoint_bytes=weight_bytes(shape, r.quantization, 2).total)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"
