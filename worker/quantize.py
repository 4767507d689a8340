"""`k2serve quantize SRC DST`: a bf16 Hugging Face K2 / DeepSeek-V3 checkpoint -> the INT4 layout Kimi K2 Thinking
ships (compressed-tensors `pack-quantized`, round-to-nearest, symmetric, group 32) for the routed experts of MoE
layers; every other tensor is copied as is. Streams shard by shard, so memory stays bounded by one output shard."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from k2serve.helptext import summary
from k2serve.worker.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    EXPERT_MODULE_RE,
    INDEX_FILE,
    ShardedWriter,
    open_shard,
    read_weight_map,
)
from k2serve.k2format.model_config import K2Config, QuantConfig
from k2serve.worker.quant.int4 import GROUP_SIZE, quantize_rtn

# K2 Thinking's ignore list: attention, shared experts, the dense MLP and lm_head stay bf16.
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def k2_quant_config(group_size: int = GROUP_SIZE) -> QuantConfig:
    return QuantConfig(group_size=group_size, ignore=list(K2_IGNORE))


def compress_tensor(name: str, tensor: torch.Tensor, qconfig: QuantConfig) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> what the quantized checkpoint stores for it: the pack-quantized triple for a routed
    expert's `weight` that the config quantizes, the tensor itself otherwise."""
    module, _, param = name.rpartition(".")
    if param != "weight" or not EXPERT_MODULE_RE.match(module) or not qconfig.is_quantized(module):
        return {name: tensor}
    if tensor.dim() != 2 or tensor.shape[1] % qconfig.group_size:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} cannot be quantized in groups of "
                         f"{qconfig.group_size} along the input dim")
    packed, scale = quantize_rtn(tensor, qconfig.group_size)  # [out, in/8] int32, [out, in/g] bf16
    return {f"{module}.weight_packed": packed, f"{module}.weight_scale": scale,
            f"{module}.weight_shape": torch.tensor(tuple(tensor.shape), dtype=torch.int64)}


def _check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: destination exists and is not an empty directory")


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    group_size: int = GROUP_SIZE,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Writes the quantized checkpoint into `dst` (absent or empty) and returns it. On failure what was written
    is removed again, so a half-written checkpoint is never left behind to be loaded."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source model directory does not exist")
    config = K2Config.from_dir(src)
    if config.quantization is not None:
        raise ValueError(f"{src / 'config.json'}: source is already quantized (has a quantization_config)")
    weight_map, map_file = read_weight_map(src)
    packed = sorted(n for n in weight_map if n.endswith(".weight_packed"))
    if packed:
        raise ValueError(f"{map_file}: source is already quantized (holds packed tensor {packed[0]!r})")
    _check_destination(dst)
    qconfig = k2_quant_config(group_size)
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        _convert(src, dst, weight_map, map_file, qconfig, max_shard_bytes, progress)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:  # an empty directory the user made (a mounted volume, say) stays, empty again
            for entry in dst.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        raise
    return dst


def _convert(src: Path, dst: Path, weight_map: dict[str, str], map_file: Path, qconfig: QuantConfig,
             max_shard_bytes: int, progress: bool) -> None:
    writer = ShardedWriter(dst, max_shard_bytes)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    with tqdm(total=len(weight_map), unit="tensor", desc="quantize", disable=not progress) as bar:
        for file in sorted(by_file):
            with open_shard(src / file, map_file) as shard:
                for name in sorted(by_file[file]):
                    tensor = shard.get(name)
                    try:
                        compressed = compress_tensor(name, tensor, qconfig)
                    except ValueError as e:
                        raise ValueError(f"{shard.path}: {e}") from e
                    for out_name, t in compressed.items():
                        writer.add(out_name, t)
                    bar.update(1)
    writer.close()
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = qconfig.to_hf()
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for entry in sorted(src.iterdir()):  # tokenizer, chat template, generation config, ...
        if entry.name in ("config.json", INDEX_FILE) or entry.name.endswith(".safetensors"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve quantize", description=summary(__doc__))
    parser.add_argument("src", type=Path, help="bf16 Hugging Face model directory")
    parser.add_argument("dst", type=Path, help="output directory (must be absent or empty)")
    parser.add_argument("--group-size", type=int, default=GROUP_SIZE, help="INT4 group size along the input dim")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="upper bound on one output safetensors file")
    args = parser.parse_args(argv)
    if args.group_size <= 0 or args.group_size % 8:
        parser.error(f"--group-size must be a positive multiple of 8, got {args.group_size}")
    try:
        out = quantize_checkpoint(args.src, args.dst, args.group_size, max_shard_bytes=args.max_shard_bytes)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"k2serve quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
