"""`k2serve plan`: the capacity planner's table for a model over GPU kinds and expert-parallel sizes."""

from __future__ import annotations

import argparse

from k2serve.capacity import (GIB, GPU_MEMORY, ModelShape, Plan, PlanRequest, fmt_bytes, load_config, plan,
                              shipped_configs)

_COLUMNS = ("device", "EP", "experts", "replicated", "activations", "reserve", "KV cache", "KV tokens",
            "seqs@ctx/group", "fits")


def _row(device: str, p: Plan) -> tuple[str, ...]:
    kv = fmt_bytes(p.kv_bytes) if p.kv_bytes > 0 else f"short {fmt_bytes(-p.kv_bytes)}"
    return (device, str(p.request.expert_parallel), fmt_bytes(p.expert_bytes), fmt_bytes(p.replicated_bytes),
            fmt_bytes(p.activation_bytes), fmt_bytes(p.reserve_bytes), kv, f"{p.kv_tokens:,}",
            str(p.group_sequences), "yes" if p.fits else "NO")


def table(rows: list[tuple[str, ...]]) -> str:
    """A Markdown table (it reads in a terminal and pastes into docs unchanged)."""
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(_COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve plan", description="Per-GPU memory, KV token budget and "
                                     "concurrent full-context sequences of one expert-parallel group.")
    parser.add_argument("--model", default="kimi-k2-thinking",
                        help=f"shipped config ({', '.join(shipped_configs())}), a config.json or a model folder")
    parser.add_argument("--quantization", choices=("int4", "bf16"), default="int4",
                        help="routed-expert weight format (int4: K2 Thinking's W4A16 group-32)")
    parser.add_argument("--gpu", nargs="+", default=["H100-80GB", "H200-141GB"], choices=sorted(GPU_MEMORY),
                        help="devices to plan for")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="plan for a device of this many GiB instead of --gpu")
    parser.add_argument("--ep", nargs="+", type=int, default=[8, 16], help="expert-parallel sizes")
    parser.add_argument("--context", type=int, default=262144, help="tokens of the longest sequence")
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="token budget of one engine step (sizes the activations)")
    parser.add_argument("--max-running", type=int, default=256, help="most sequences a group runs at once")
    parser.add_argument("--reserve-gib", type=float, default=4.0, help="kept free per device (CUDA, NCCL, ...)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model)
        shape = ModelShape.from_config(config)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    devices = ([(f"{args.device_memory_gib:g} GiB", int(args.device_memory_gib * GIB))] if args.device_memory_gib
               else [(gpu, GPU_MEMORY[gpu]) for gpu in args.gpu])
    rows, plans = [], []
    for device, memory in devices:
        for ep in args.ep:
            try:
                p = plan(PlanRequest(shape=shape, quantization=args.quantization, device_memory=memory,
                                     expert_parallel=ep, max_context=args.context,
                                     max_batch_tokens=args.max_batch_tokens, max_running=args.max_running,
                                     reserve=int(args.reserve_gib * GIB)))
            except ValueError as e:
                parser.error(str(e))
            rows.append(_row(device, p))
            plans.append(p)
    first = plans[0]
    print(f"{args.model} ({args.quantization}): checkpoint {fmt_bytes(first.checkpoint_bytes)}, KV cache "
          f"{first.kv_bytes_per_token:,} bytes/token (MLA latent), context {args.context:,}, "
          f"max batch tokens {args.max_batch_tokens}, max running {args.max_running}; bytes per device")
    print(table(rows))
    return 0
