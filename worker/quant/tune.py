"""Sweep the fused-MoE tiles on this GPU and write `configs/<device>.json`.

    python -m k2serve.worker.quant.tune                      # K2 shards for EP 8 and 16, buckets 1..4096
    python -m k2serve.worker.quant.tune --smoke --out DIR    # tiny shapes on the CPU interpreter (proves the path)

Per shape and batch bucket, for each BLOCK_M: the gate_up tiles are swept with the down tiles at the first
candidate, then the down tiles with gate_up at its best; the fastest whole call (median) wins. Tiles the
compiler rejects for this device (e.g. too much shared memory) are skipped. Other shapes already in the file
are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from k2serve.worker.quant.triton_config import (
    CONFIG_DIR, ConfigFile, GemmConfig, MoEConfig, device_file_name, shape_key,
)
from k2serve.worker.quant.triton_workload import (
    K2_EXPERTS, K2_HIDDEN, K2_INTERMEDIATE, K2_TOP_K, MoEShape, median_seconds, random_shard, shard_routing,
)

SMOKE_SHAPE = {"hidden": 64, "intermediate": 64, "num_experts": 8, "top_k": 2}


def gemm_candidates(smoke: bool) -> list[GemmConfig]:
    if smoke:
        return [GemmConfig(block_n=n, block_k=k) for n, k in ((32, 32), (64, 64))]
    grid = itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
    return [GemmConfig(block_n=n, block_k=k, num_warps=w, num_stages=s) for n, k, w, s in grid]


def block_m_candidates(tokens: int, top_k: int, smoke: bool) -> list[int]:
    """BLOCK_M beyond the slots one expert can receive only pads."""
    if smoke:
        return [16]
    return [m for m in (16, 32, 64, 128) if m == 16 or m <= tokens * top_k]


def tune_bucket(shape: MoEShape, tokens: int, device: torch.device, smoke: bool) -> tuple[MoEConfig, float]:
    """-> the fastest config for `tokens` tokens on this shard shape and its median seconds."""
    from triton.runtime.errors import OutOfResources

    from k2serve.worker.quant.triton_moe import fused_moe

    shard = random_shard(shape, device)
    dtype = torch.float16 if smoke else torch.bfloat16
    x = torch.randn(tokens, shape.hidden, device=device).to(dtype)  # [T, H]
    ids, weights = shard_routing(shape, tokens, device)

    def seconds(cfg: MoEConfig) -> float:
        try:
            return median_seconds(lambda: fused_moe(x, ids, weights, shard, config=cfg), device)
        except OutOfResources:  # a tile this device cannot hold is a losing candidate, not a failed sweep
            return float("inf")

    tiles = gemm_candidates(smoke)
    best: tuple[float, MoEConfig] | None = None
    for block_m in block_m_candidates(tokens, shape.top_k, smoke):
        timed = [(seconds(MoEConfig(block_m=block_m, gate_up=t, down=tiles[0])), t) for t in tiles]
        gate_up = min(timed, key=lambda p: p[0])[1]
        for t in tiles:
            cfg = MoEConfig(block_m=block_m, gate_up=gate_up, down=t)
            s = seconds(cfg)
            if best is None or s < best[0]:
                best = (s, cfg)
    assert best is not None
    if best[0] == float("inf"):
        raise RuntimeError(f"no candidate tile runs on this device for {shape} at {tokens} tokens")
    return best[1], best[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--ep", type=int, nargs="+", help="expert-parallel sizes (default 8 16; smoke 2)")
    p.add_argument("--batches", type=int, nargs="+", help="bucket sizes (default 1 8 32 128 256 4096; smoke 1 5)")
    p.add_argument("--out", type=Path, default=CONFIG_DIR, help="folder for <device>.json")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`
    elif not torch.cuda.is_available():
        print("tune: tuning needs a CUDA device (or --smoke for the CPU interpreter path)", file=sys.stderr)
        return 2
    from k2serve.worker.quant.triton_moe import device_name  # imports triton: after the interpreter choice

    device = torch.device("cpu" if args.smoke else "cuda")
    name = device_name(device)
    base = SMOKE_SHAPE if args.smoke else {
        "hidden": K2_HIDDEN, "intermediate": K2_INTERMEDIATE, "num_experts": K2_EXPERTS, "top_k": K2_TOP_K,
    }
    path = args.out / device_file_name(name)
    shapes = ConfigFile.model_validate_json(path.read_text()).shapes if path.exists() else {}
    for ep in args.ep or ([2] if args.smoke else [8, 16]):
        shape = MoEShape(ep=ep, **base)
        key = shape_key(shape.num_local, shape.hidden, shape.intermediate, shape.top_k)
        buckets: dict[int, MoEConfig] = {}
        for tokens in args.batches or ([1, 5] if args.smoke else [1, 8, 32, 128, 256, 4096]):
            buckets[tokens], secs = tune_bucket(shape, tokens, device, args.smoke)
            print(f"{key} T={tokens}: {secs * 1e6:.1f} us {buckets[tokens].model_dump_json()}", flush=True)
        shapes[key] = buckets
    command = "python -m k2serve.worker.quant.tune " + shlex.join(argv)
    out = ConfigFile(device=name, source=f"tuned on {name} by `{command.strip()}`", shapes=shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out.model_dump(mode="json"), indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
