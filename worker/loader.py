"""Loads a Hugging Face layout K2 / DeepSeek-V3 checkpoint for one worker: every non-expert tensor plus the routed
experts of one expert range, read tensor by tensor from the safetensors shards (a worker of an expert-parallel
group never materialises the whole checkpoint). INT4 experts stay packed as stored."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2serve.worker.checkpoint import (
    EXPERT_PROJS,
    PACKED_SUFFIXES,
    dense_shapes,
    expert_module,
    expert_shape,
    open_shard,
    packed_shapes,
    read_weight_map,
)
from k2serve.worker.model.config import K2Config
from k2serve.worker.quant.moe import ExpertShard

BUILTIN_TINY = "builtin:tiny-k2"
BUILTIN_AGENT = "builtin:tiny-k2-agent"  # trained, shipped in the repository (worker/agent_model/weights)
_FLOAT32_TENSORS = ("e_score_correction_bias",)  # routing ties are decided by this bias: never round it
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoadStats:
    tensors_read: int = 0
    bytes_read: int = 0
    expert_bytes_read: int = 0  # the routed experts' share of bytes_read
    per_file: dict[str, int] = field(default_factory=dict)  # shard file name -> tensors read from it
    names: list[str] = field(default_factory=list)  # every tensor read, in reading order

    def record(self, file: str, name: str, tensor: torch.Tensor, expert: bool) -> None:
        size = tensor.numel() * tensor.element_size()
        self.tensors_read += 1
        self.bytes_read += size
        self.expert_bytes_read += size if expert else 0
        self.per_file[file] = self.per_file.get(file, 0) + 1
        self.names.append(name)


@dataclass
class ModelWeights:
    config: K2Config
    dense: dict[str, torch.Tensor]  # HF name -> tensor; lm_head.weight aliases the embedding when tied
    experts: dict[int, ExpertShard]  # MoE layer -> experts [expert_range)
    expert_range: tuple[int, int]
    stats: LoadStats


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor goes: a dense entry, or rows of a layer's stacked expert tensor."""

    shape: tuple[int, ...]
    dense: str | None = None
    layer: int = -1
    local: int = -1
    kind: str = ""  # w13, w2, w13_scale, w2_scale, or shape (checked, not kept)
    row: int = 0  # first row inside w13 / w13_scale: gate rows come first, then up rows


def _check_range(config: K2Config, expert_range: tuple[int, int] | None) -> tuple[int, int]:
    n = config.n_routed_experts
    if expert_range is None:
        return 0, n
    a, b = expert_range
    if not (0 <= a < b <= n):
        raise ValueError(f"expert_range {expert_range} must satisfy 0 <= start < end <= n_routed_experts ({n})")
    return a, b


def _plan(config: K2Config, model_dir: Path, weight_map: dict[str, str], map_file: Path,
          expert_range: tuple[int, int]) -> dict[str, _Slot]:
    """tensor name -> slot, for exactly the tensors this worker needs; every format mismatch is raised here,
    before a byte of tensor data is read."""
    q = config.quantization

    def packed(module: str) -> bool:
        return q is not None and q.is_quantized(module)

    def locate(module: str, want_packed: bool) -> None:
        right, wrong = f"{module}.weight", f"{module}.weight_packed"
        if want_packed:
            right, wrong = wrong, right
        if wrong in weight_map and right not in weight_map:
            raise ValueError(f"{model_dir / weight_map[wrong]}: tensor {wrong!r} is stored "
                             f"{'plain' if want_packed else 'packed'}, but config.json's quantization_config makes "
                             f"{module} {'packed INT4' if want_packed else 'plain (unquantized)'}")

    plan: dict[str, _Slot] = {}
    for name, shape in dense_shapes(config).items():
        module, _, param = name.rpartition(".")
        # compressed-tensors targets Linear layers only: the *_proj projections and lm_head (not the router gate).
        is_linear = param == "weight" and ("_proj" in module.rpartition(".")[2] or module == "lm_head")
        if is_linear and packed(module):
            raise ValueError(f"{model_dir / 'config.json'}: quantization_config.ignore leaves {module} quantized; "
                             "k2serve keeps only routed experts INT4 (as K2 Thinking ships them)")
        if is_linear:
            locate(module, want_packed=False)
        plan[name] = _Slot(shape, dense=name)
    a, b = expert_range
    i, g = config.moe_intermediate_size, q.group_size if q is not None else 0
    for layer in config.moe_layers:
        layer_packed = packed(expert_module(layer, a, EXPERT_PROJS[0]))
        for e in range(a, b):
            for proj in EXPERT_PROJS:
                module = expert_module(layer, e, proj)
                if packed(module) != layer_packed:
                    raise ValueError(f"{model_dir / 'config.json'}: quantization_config.ignore quantizes only some "
                                     f"routed experts of layer {layer} (e.g. {module}); a layer's experts must "
                                     "share one format")
                locate(module, layer_packed)
                w = "w2" if proj == "down_proj" else "w13"
                row = i if proj == "up_proj" else 0
                base = dict(layer=layer, local=e - a, row=row)
                if not layer_packed:
                    plan[f"{module}.weight"] = _Slot(expert_shape(config, proj), kind=w, **base)
                    continue
                shapes = packed_shapes(expert_shape(config, proj), g)
                for suffix, kind in zip(PACKED_SUFFIXES, (w, f"{w}_scale", "shape")):
                    plan[f"{module}.{suffix}"] = _Slot(shapes[suffix], kind=kind, **base)
    missing = [n for n in plan if n not in weight_map]
    if missing:
        raise ValueError(f"{map_file}: tensor {missing[0]!r} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return plan


def load_weights(
    model_dir: str | Path,
    config: K2Config | None = None,
    *,
    expert_range: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelWeights:
    model_dir = Path(model_dir)
    config = config if config is not None else K2Config.from_dir(model_dir)
    rng = _check_range(config, expert_range)
    weight_map, map_file = read_weight_map(model_dir)
    plan = _plan(config, model_dir, weight_map, map_file, rng)
    by_file: dict[str, list[str]] = {}
    for name in plan:
        by_file.setdefault(weight_map[name], []).append(name)

    stats = LoadStats()
    dense: dict[str, torch.Tensor] = {}
    stacked: dict[tuple[int, str], torch.Tensor] = {}  # (layer, kind) -> [E_l, rows, cols]
    num_local, inter = rng[1] - rng[0], config.moe_intermediate_size
    for file in sorted(by_file):
        with open_shard(model_dir / file, map_file) as shard:
            for name in sorted(by_file[file]):
                slot = plan[name]
                actual = shard.shape(name)
                if actual != slot.shape:
                    raise ValueError(f"{shard.path}: tensor {name!r} has shape {list(actual)}, the config implies "
                                     f"{list(slot.shape)}")
                t = shard.get(name)
                stats.record(file, name, t, expert=slot.dense is None)
                if slot.dense is not None:
                    _check_float(shard.path, name, t)
                    keep = torch.float32 if name.endswith(_FLOAT32_TENSORS) else dtype
                    dense[name] = t.to(device=device, dtype=keep)
                elif slot.kind == "shape":
                    _check_weight_shape(shard.path, name, t, config)
                else:
                    _put_expert(stacked, shard.path, name, t, slot, num_local, inter, dtype, device)
    if config.tie_word_embeddings:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    experts = {
        layer: ExpertShard(start=rng[0], num_experts=config.n_routed_experts, w13=stacked[layer, "w13"],
                           w2=stacked[layer, "w2"], w13_scale=stacked.get((layer, "w13_scale")),
                           w2_scale=stacked.get((layer, "w2_scale")))
        for layer in config.moe_layers
    }
    return ModelWeights(config, dense, experts, rng, stats)


def _check_float(path: Path, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a floating-point tensor")


def _check_weight_shape(path: Path, name: str, t: torch.Tensor, config: K2Config) -> None:
    proj = name.rsplit(".", 2)[-2]
    expected = list(expert_shape(config, proj))
    if t.is_floating_point() or t.tolist() != expected:
        raise ValueError(f"{path}: tensor {name!r} holds {t.tolist()}, the config implies {expected}")


def _put_expert(stacked: dict[tuple[int, str], torch.Tensor], path: Path, name: str, t: torch.Tensor, slot: _Slot,
                num_local: int, inter: int, dtype: torch.dtype, device: str | torch.device) -> None:
    if slot.kind in ("w13", "w2") and name.endswith("weight_packed"):
        if t.dtype != torch.int32:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected int32 packed INT4 words")
        target_dtype = torch.int32
    else:
        _check_float(path, name, t)
        # Scales stay in their stored dtype (bf16 for K2): dequantization must see exactly what was saved.
        target_dtype = t.dtype if slot.kind.endswith("_scale") else dtype
    key = (slot.layer, slot.kind)
    if key not in stacked:
        rows = 2 * inter if slot.kind.startswith("w13") else t.shape[0]
        stacked[key] = torch.empty(num_local, rows, t.shape[1], dtype=target_dtype, device=device)
    stacked[key][slot.local, slot.row:slot.row + t.shape[0]] = t.to(device=device, dtype=target_dtype)


def resolve_model(source: str, cache_dir: str | Path | None = None) -> Path:
    """A model source as users write it -> a local Hugging Face layout directory."""
    if source == BUILTIN_TINY:
        from k2serve.worker.tiny import ensure_tiny

        return ensure_tiny(Path(cache_dir) if cache_dir is not None else None)
    if source == BUILTIN_AGENT:
        from k2serve.worker.agent_model.builtin import agent_model_dir

        return agent_model_dir()
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {source!r} (available: {BUILTIN_TINY}, {BUILTIN_AGENT})")
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source:
        raise ValueError(f"{source}: remote model URIs are not supported here; mount the model as a volume "
                         "and pass its local directory")
    path = Path(source).expanduser()
    if not path.exists():
        hint = (" (k2serve never downloads models: fetch it once, mount it as a volume and pass its directory)"
                if _HUB_ID.fullmatch(source) else "")
        raise FileNotFoundError(f"{source}: no such model directory{hint}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path
