"""Triton MLA attention kernels vs the torch paths on the same device, at K2's per-rank attention dims.

    python bench/kernel_mla.py                 # GPU: 64 heads, c 512, r 64, nope 128, v 128, bf16, page 16
    python bench/kernel_mla.py --smoke         # CPU: tiny dims under TRITON_INTERPRET=1 (proves the path only)

Decode: B sequences of L cached tokens, one new token each. Triton: one absorbed launch over the batch (keys read
through the block tables). Torch: each sequence's blocks gathered and one dense softmax per batch (what CUDA ran
before the kernel). Columns: median µs (triton.testing.do_bench), MB of latent cache the step must read, GB/s,
% of the measured device copy bandwidth.
Prefill: one chunk of n new tokens after `start` cached ones. Triton absorbed and multi-head form against the
torch tiles (`attend_absorbed`, `attend_decompressed`) on the same device; median µs each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from k2serve.worker.model.attention_tiles import Tiles, attend_absorbed, attend_decompressed
from k2serve.worker.model.batch import ForwardBatch, SeqSlice
from k2serve.worker.quant.triton_workload import copy_bandwidth, median_seconds

SCALE = 192**-0.5  # K2: 1 / sqrt(nope + r), before YaRN's mscale


@dataclass(frozen=True)
class Dims:
    heads: int
    latent: int
    rope: int
    nope: int
    v_dim: int
    page: int


K2_RANK = Dims(64, 512, 64, 128, 128, 16)
SMOKE = Dims(4, 64, 16, 32, 32, 16)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims on CPU under the Triton interpreter")
    p.add_argument("--batches", type=int, nargs="+", help="decoding sequences (default 1 32 128; smoke 1 3)")
    p.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default 4096 32768; smoke 40 100)")
    p.add_argument("--prefill", type=int, nargs=2, action="append", metavar=("START", "N"),
                   help="prefill chunks (default 0 2048 and 30720 2048; smoke 0 37)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton` (inside the kernel modules)
    elif not torch.cuda.is_available():
        print("kernel_mla: no CUDA device; run with --smoke for the CPU interpreter path", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter has no bf16 arithmetic
    dims = SMOKE if args.smoke else K2_RANK
    batches = args.batches or ([1, 3] if args.smoke else [1, 32, 128])
    contexts = args.contexts or ([40, 100] if args.smoke else [4096, 32768])
    chunks = args.prefill or ([[0, 37]] if args.smoke else [[0, 2048], [30720, 2048]])
    bandwidth = copy_bandwidth(device, (16 << 20) if args.smoke else (1 << 30))
    decode = [bench_decode(dims, b, ctx, device, dtype, bandwidth) for ctx in contexts for b in batches]
    prefill = [bench_prefill(dims, start, n, device, dtype) for start, n in chunks]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; {dtype}; {dims}")
    print(markdown(decode, prefill))
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": bandwidth / 1e9, "decode": decode, "prefill": prefill},
                                        indent=1))
    return 0


def _paged_batch(dims: Dims, lengths: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
                 ) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
    """Sequences of (start, new tokens) over shuffled cache blocks -> (batch, cache [slots, c + r], queries
    [T, H, c + r] in latent space)."""
    gen = torch.Generator().manual_seed(0)
    nbs = [-(-(start + n) // dims.page) for start, n in lengths]
    order = torch.randperm(sum(nbs), generator=gen)
    cache = torch.randn(sum(nbs) * dims.page, dims.latent + dims.rope, device=device).to(dtype)
    seqs, row, used = [], 0, 0
    for (start, n), nb in zip(lengths, nbs):
        slots = (order[used : used + nb, None] * dims.page + torch.arange(dims.page)).flatten()
        seqs.append(SeqSlice(row, n, start, slots))
        row, used = row + n, used + nb
    tables = torch.nn.utils.rnn.pad_sequence([order[sum(nbs[:i]) : sum(nbs[: i + 1])] for i in range(len(nbs))],
                                             batch_first=True)  # [S, nb]
    batch = ForwardBatch(torch.zeros(row, dtype=torch.int64), torch.zeros(row, dtype=torch.int64), seqs,
                         torch.zeros(1, dtype=torch.int64), tables)
    q = torch.randn(row, dims.heads, dims.latent + dims.rope, device=device).to(dtype)
    return batch, cache, q


def bench_decode(dims: Dims, batch_size: int, ctx: int, device: torch.device, dtype: torch.dtype,
                 bandwidth: float) -> dict[str, float]:
    from k2serve.worker.kernels.triton_mla import MLATiles, paged_mla_absorbed  # after the interpreter choice

    batch, cache, q = _paged_batch(dims, [(ctx - 1, 1)] * batch_size, device, dtype)
    tiles = MLATiles.for_shape(dims.heads, dims.latent)
    plan = batch.paged_plan(dims.page, tiles.block_q, device)
    blocks = batch.block_tables.to(device)  # type: ignore[union-attr]  # [B, nb]
    c = dims.latent

    def kernel() -> torch.Tensor:
        return paged_mla_absorbed(q[..., :c], q[..., c:], cache, plan, SCALE, tiles)

    def gathered() -> torch.Tensor:
        keys = cache.view(-1, dims.page * cache.shape[1]).index_select(0, blocks.flatten()).view(
            batch_size, -1, cache.shape[1])[:, :ctx]  # [B, ctx, c + r]
        scores = torch.bmm(q, keys.transpose(1, 2)) * SCALE  # [B, H, ctx]
        return torch.bmm(scores.softmax(-1, dtype=torch.float32).to(dtype), keys[..., :c])  # [B, H, c]

    kernel_s, torch_s = median_seconds(kernel, device), median_seconds(gathered, device)
    got, want = kernel().float(), gathered().float()
    nbytes = batch_size * ctx * cache.shape[1] * cache.element_size()
    return {"batch": batch_size, "context": ctx, "mb": nbytes / 1e6, "triton_us": kernel_s * 1e6,
            "triton_gbps": nbytes / kernel_s / 1e9, "triton_pct_copy": 100 * nbytes / kernel_s / bandwidth,
            "torch_us": torch_s * 1e6, "max_rel_err_vs_torch": float((got - want).abs().max() / want.abs().max())}


def bench_prefill(dims: Dims, start: int, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    from k2serve.worker.kernels.triton_mla import ExpandedTiles, MLATiles, mla_expanded, paged_mla_absorbed

    batch, cache, q = _paged_batch(dims, [(start, n)], device, dtype)
    tiles = MLATiles.for_shape(dims.heads, dims.latent)
    plan = batch.paged_plan(dims.page, tiles.block_q, device)
    slots = batch.seqs[0].slots.to(device)
    c, h = dims.latent, dims.heads
    gen = torch.Generator().manual_seed(1)
    w_uk_t = (torch.randn(h, c, dims.nope, generator=gen) / c**0.5).to(device, dtype)  # [H, c, nope]
    w_uv_t = (torch.randn(h, c, dims.v_dim, generator=gen) / c**0.5).to(device, dtype)  # [H, c, v]
    q_nope = torch.randn(n, h, dims.nope, generator=gen).to(device, dtype)
    q_rope = q[..., c:]

    def read(a: int, b: int) -> torch.Tensor:
        return cache[slots[a:b]]

    expanded_tiles = ExpandedTiles.for_shape(h, dims.nope, dims.v_dim, dtype)
    torch_tiles = Tiles.for_heads(h)
    runs = {
        "triton_absorbed": lambda: paged_mla_absorbed(q[..., :c], q_rope, cache, plan, SCALE, tiles),
        "triton_multi_head": lambda: mla_expanded(q_nope, q_rope, read, start, c, w_uk_t, w_uv_t, SCALE,
                                                  expanded_tiles),
        "torch_absorbed": lambda: attend_absorbed(q, read, start, c, SCALE, torch_tiles),
        "torch_multi_head": lambda: attend_decompressed(q_nope, q_rope, read, start, c, w_uk_t, w_uv_t, SCALE,
                                                        torch_tiles),
    }
    row: dict[str, float] = {"start": start, "new": n}
    for name, fn in runs.items():
        row[f"{name}_us"] = median_seconds(fn, device) * 1e6
    for form in ("absorbed", "multi_head"):
        got, want = runs[f"triton_{form}"]().float(), runs[f"torch_{form}"]().float()
        row[f"max_rel_err_{form}"] = float((got - want).abs().max() / want.abs().max())
    return row


def markdown(decode: list[dict[str, float]], prefill: list[dict[str, float]]) -> str:
    head = "| B | context | MB | Triton µs | GB/s | % copy BW | torch gather µs | rel err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in decode:
        lines.append(f"| {r['batch']} | {r['context']} | {r['mb']:.1f} | {r['triton_us']:.1f} "
                     f"| {r['triton_gbps']:.0f} | {r['triton_pct_copy']:.0f}% | {r['torch_us']:.1f} "
                     f"| {r['max_rel_err_vs_torch']:.1e} |")
    head = ("| start | new | Triton absorbed µs | torch absorbed µs | rel err | Triton multi-head µs "
            "| torch multi-head µs | rel err |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in prefill:
        lines.append(f"| {r['start']} | {r['new']} | {r['triton_absorbed_us']:.0f} | {r['torch_absorbed_us']:.0f} "
                     f"| {r['max_rel_err_absorbed']:.1e} | {r['triton_multi_head_us']:.0f} "
                     f"| {r['torch_multi_head_us']:.0f} | {r['max_rel_err_multi_head']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
