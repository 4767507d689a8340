"""Fused INT4 MoE kernel vs torch on the dequantized weights, on K2 expert-shard shapes.

    python bench/kernel_moe.py                 # GPU: K2 shapes (H 7168, I 2048, 384 experts top-8), EP 8 and 16
    python bench/kernel_moe.py --smoke         # CPU: tiny shapes under TRITON_INTERPRET=1 (proves the path only)

Per (EP, batch): median time (triton.testing.do_bench), the bytes a perfect kernel must move (packed weights and
scales of the experts the batch touches, x in, out back), GB/s, % of the measured device copy bandwidth, the
floor (bytes / copy bandwidth), and the same for torch on the bf16 dequantized weights in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from k2serve.worker.quant.int4 import dequantize
from k2serve.worker.quant.triton_workload import (
    K2_EXPERTS, K2_HIDDEN, K2_INTERMEDIATE, K2_TOP_K, MoEShape, copy_bandwidth, median_seconds, random_shard,
    shard_routing, touched_experts,
)

SMOKE_SHAPE = {"hidden": 64, "intermediate": 64, "num_experts": 16, "top_k": 4}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--ep", type=int, nargs="+", help="expert-parallel sizes (default 8 16; smoke 2 4)")
    p.add_argument("--batches", type=int, nargs="+", help="tokens per shard (default 1 8 32 128 256; smoke 1 3)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        # Must precede the first `import triton` (below, inside the k2serve modules).
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("kernel_moe: no CUDA device; run with --smoke for the CPU interpreter path", file=sys.stderr)
        return 2

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter has no bf16 arithmetic
    base = SMOKE_SHAPE if args.smoke else {
        "hidden": K2_HIDDEN, "intermediate": K2_INTERMEDIATE, "num_experts": K2_EXPERTS, "top_k": K2_TOP_K,
    }
    eps = args.ep or ([2, 4] if args.smoke else [8, 16])
    batches = args.batches or ([1, 3] if args.smoke else [1, 8, 32, 128, 256])
    bandwidth = copy_bandwidth(device, (16 << 20) if args.smoke else (1 << 30))
    rows = []
    for ep in eps:
        shape = MoEShape(ep=ep, **base)
        rows += bench_shape(shape, batches, device, dtype, bandwidth)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; activations {dtype}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": bandwidth / 1e9, "rows": rows}, indent=1))
    return 0


def bench_shape(
    shape: MoEShape, batches: list[int], device: torch.device, dtype: torch.dtype, bandwidth: float
) -> list[dict[str, float]]:
    from k2serve.worker.quant.triton_moe import fused_moe  # imports triton: after the interpreter choice

    shard = random_shard(shape, device)
    assert shard.w13_scale is not None and shard.w2_scale is not None
    # Dequantized one expert at a time: unpacking a whole shard at once would need ~8x its bf16 size.
    w13 = torch.stack([dequantize(shard.w13[e], shard.w13_scale[e], dtype) for e in range(shape.num_local)])
    w2 = torch.stack([dequantize(shard.w2[e], shard.w2_scale[e], dtype) for e in range(shape.num_local)])
    packed = (shard.w13, shard.w2, shard.w13_scale, shard.w2_scale)
    packed_per_expert = sum(t[0].numel() * t.element_size() for t in packed)
    dense_per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    rows = []
    for tokens in batches:
        x = torch.randn(tokens, shape.hidden, device=device).to(dtype)  # [T, H]
        ids, weights = shard_routing(shape, tokens, device)
        groups = expert_groups(ids)
        touched = touched_experts(ids, shape.num_local)
        io_bytes = 2 * x.numel() * x.element_size()  # x in, out back
        fused_s = median_seconds(lambda: fused_moe(x, ids, weights, shard), device)
        dense_s = median_seconds(lambda: torch_moe(x, groups, weights, w13, w2), device)
        got, want = fused_moe(x, ids, weights, shard).float(), torch_moe(x, groups, weights, w13, w2).float()
        fused_bytes = touched * packed_per_expert + io_bytes
        dense_bytes = touched * dense_per_expert + io_bytes
        rows.append({
            "ep": shape.ep, "num_local": shape.num_local, "batch": tokens, "experts_touched": touched,
            "fused_us": fused_s * 1e6, "fused_mb": fused_bytes / 1e6, "fused_gbps": fused_bytes / fused_s / 1e9,
            "fused_pct_copy": 100 * fused_bytes / fused_s / bandwidth, "floor_us": fused_bytes / bandwidth * 1e6,
            "torch_us": dense_s * 1e6, "torch_mb": dense_bytes / 1e6, "torch_gbps": dense_bytes / dense_s / 1e9,
            "max_rel_err_vs_torch": float((got - want).abs().max() / want.abs().max()),
        })
    return rows


def expert_groups(topk_ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(local expert, token rows, slot columns) per touched expert, found once outside the timed region."""
    return [(e, *torch.nonzero(topk_ids == e, as_tuple=True)) for e in torch.unique(topk_ids).tolist()]


def torch_moe(
    x: torch.Tensor,
    groups: list[tuple[int, torch.Tensor, torch.Tensor]],
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The torch baseline: one dense GEMM pair per touched expert on the dequantized weights."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for e, tok, slot in groups:
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w2[e])  # [n, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot].unsqueeze(-1))
    return out.to(x.dtype)


def markdown(rows: list[dict[str, float]]) -> str:
    head = ("| EP | experts/shard | batch | touched | fused µs | MB | GB/s | % copy BW | floor µs "
            "| torch dense µs | MB | GB/s | rel err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['ep']} | {r['num_local']} | {r['batch']} | {r['experts_touched']} | {r['fused_us']:.1f} "
            f"| {r['fused_mb']:.2f} | {r['fused_gbps']:.0f} | {r['fused_pct_copy']:.0f}% | {r['floor_us']:.1f} "
            f"| {r['torch_us']:.1f} | {r['torch_mb']:.2f} | {r['torch_gbps']:.0f} | {r['max_rel_err_vs_torch']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
