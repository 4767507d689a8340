"""Block-size configs of the Triton fused MoE, stored as data: `configs/<device>.json` (written by `tune.py` on
that GPU) keyed by expert-shard shape, then by batch-size bucket. `configs/default.json` answers for devices and
shapes nobody tuned (and for the CPU interpreter)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_DEVICE = "default"
ANY_SHAPE = "*"


class GemmConfig(BaseModel):
    """Tiles of one grouped GEMM (gate_up or down)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    block_n: int = Field(ge=16)
    # A whole number of 32-wide quantization groups, and >= 16 so 16-bit dots are legal on sm_90.
    block_k: int = Field(ge=32, multiple_of=32)
    num_warps: int = Field(default=4, ge=1, le=16)
    num_stages: int = Field(default=2, ge=1, le=8)

    @field_validator("block_n")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_n must be a power of two, got {v}")
        return v


class MoEConfig(BaseModel):
    """One launch of the fused MoE. block_m is shared: the token slots are padded to it once for both GEMMs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    block_m: int = Field(ge=16)
    gate_up: GemmConfig
    down: GemmConfig

    @field_validator("block_m")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_m must be a power of two, got {v}")
        return v


class ConfigFile(BaseModel):
    """`configs/<device>.json`: shape key -> {batch bucket (max tokens) -> config}."""

    model_config = ConfigDict(extra="forbid")
    device: str
    source: str  # how the numbers were obtained (tuning command, or why they are hand-picked)
    shapes: dict[str, dict[int, MoEConfig]]

    @field_validator("shapes")
    @classmethod
    def _non_empty(cls, v: dict[str, dict[int, MoEConfig]]) -> dict[str, dict[int, MoEConfig]]:
        empty = [shape for shape, buckets in v.items() if not buckets]
        if empty:
            raise ValueError(f"shapes without batch buckets: {empty}")
        return v


def shape_key(num_local: int, hidden: int, intermediate: int, top_k: int) -> str:
    return f"E={num_local},H={hidden},I={intermediate},k={top_k}"


def device_file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3.json'."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json"


def config_path(device_name: str) -> Path:
    return CONFIG_DIR / device_file_name(device_name)


@functools.cache
def load_config_file(path: Path) -> ConfigFile:
    """Parsed once per process: the shipped files are read-only data."""
    return ConfigFile.model_validate_json(path.read_text())


def pick_bucket(buckets: dict[int, MoEConfig], num_tokens: int) -> MoEConfig:
    """The smallest bucket holding `num_tokens`, else the largest bucket."""
    fitting = [b for b in buckets if b >= num_tokens]
    return buckets[min(fitting) if fitting else max(buckets)]


def lookup_config(device_name: str, shape: str, num_tokens: int | None) -> MoEConfig:
    """Config for `num_tokens` on this device and shape; the device's own file first, then default.json (exact
    shape, then '*'). num_tokens None asks for the batch-independent config of deterministic mode: the
    smallest bucket, fixed for a given device and shape whatever the batch."""
    candidates = [config_path(device_name), config_path(DEFAULT_DEVICE)]
    for path in candidates:
        if not path.exists():
            continue
        shapes = load_config_file(path).shapes
        for key in (shape, ANY_SHAPE):
            if key in shapes:
                buckets = shapes[key]
                return buckets[min(buckets)] if num_tokens is None else pick_bucket(buckets, num_tokens)
    raise FileNotFoundError(f"no fused-MoE config for {device_name!r} / {shape}: {CONFIG_DIR} lacks default.json")


def shipped_config_files() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.json"))
