"""What the engine's deterministic (batch-invariant) mode costs: decode tokens/s of the same concurrent workload
in the default and the deterministic mode, measured in one run on the built-in tiny model.

    python bench/determinism.py [--requests 16] [--max-tokens 32] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights, resolve_checkpoint
from k2serve.worker.model.k2 import K2Model


def run(weights, deterministic: bool, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    model = K2Model(weights.config, weights.dense, weights.experts, deterministic=deterministic)
    engine = Engine(model, EngineConfig(num_blocks=2048, max_batch_tokens=1024, deterministic=deterministic),
                    eos_token_ids=[])
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens))
    start, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += len(engine.step())
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.max_tokens = 2, 3
    torch.manual_seed(0)
    weights = load_weights(resolve_checkpoint("builtin:tiny-k2"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 256, (args.requests,), generator=g)]
    rows = []
    for det in (False, True):
        seconds, tokens = run(weights, det, prompts, args.max_tokens)
        rows.append(("deterministic" if det else "default", seconds, tokens, tokens / seconds))
    print(f"{'mode':<14} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'vs default':>10}")
    for mode, seconds, tokens, tps in rows:
        print(f"{mode:<14} {seconds:>8.2f} {tokens:>7d} {tps:>9.1f} {tps / rows[0][3]:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
