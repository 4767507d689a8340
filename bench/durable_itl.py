"""What durability before visibility costs a stream: inter-token latency at the client of `RouterCore.generate`
over a stand-in group (bench/router_cpu.py's: one token per running request every `--step-ms`, no model) and the
SQLite chain store (fsync per commit), for two source trees of k2serve in alternating runs — `--base` (e.g. an
export of the commit before the change) against this checkout. Each run is a fresh process importing its tree.

    git archive <commit> | tar -x -C /tmp/base
    python bench/durable_itl.py --base /tmp/base [--runs 5] [--concurrency 8] [--max-tokens 64] [--step-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = list(range(5, 40))
FOLDERS = {"operator": "operator", "worker": "worker", "router": "router"}


def package_view(tree: Path, out: Path) -> Path:
    """A directory whose `k2serve` package is `tree`'s (its top-level folders mapped as setup.py maps them)."""
    pkg = out / "k2serve"
    pkg.mkdir(parents=True)
    for entry in (tree / "k2serve").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in FOLDERS.items():
        (pkg / name).symlink_to(tree / folder)
    return out


async def child(args: argparse.Namespace) -> dict[str, float]:
    from k2serve.config import ServingConfig
    from k2serve.metrics import Metrics
    from k2serve.router.core import RouterCore
    from k2serve.router.schedule import StaticDirectory
    from k2serve.sampling_params import SamplingParams

    tmp = Path(args.child)
    config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp / "chains.sqlite3")},
                                           "router": {"aggregated": True}})
    try:  # this tree: RouterCore builds its tokenizer and store from the config
        from k2serve.groups import GroupAddress

        core = RouterCore(config, StaticDirectory([GroupAddress("fake-0", "both", args.group)]), Metrics())
        own_store = None
    except ImportError:  # the base tree (343d782): the caller passes them in
        from k2serve.router.chains import open_store
        from k2serve.router.schedule import GroupAddress  # type: ignore[attr-defined, no-redef]
        from k2serve.worker.loader import resolve_model  # type: ignore[attr-defined]
        from k2serve.worker.tokenizer import K2Tokenizer  # type: ignore[import-not-found]

        own_store = open_store(config.chain_store)
        core = RouterCore(config, K2Tokenizer.from_dir(resolve_model(config.model.source)), own_store,  # type: ignore
                          Metrics(), StaticDirectory([GroupAddress("fake-0", "both", args.group)]))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    gaps: list[float] = []

    async def one(record: bool) -> int:
        n, last = 0, time.perf_counter()
        async for _ in core.generate(PROMPT, params):
            now = time.perf_counter()
            if record and n:
                gaps.append(now - last)
            n, last = n + 1, now
        return n

    try:
        await core.start()
        await asyncio.gather(*(one(False) for _ in range(args.concurrency)))  # warm-up
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(True) for _ in range(args.concurrency * args.requests_per_slot))))
        seconds = time.perf_counter() - t0
    finally:
        await core.aclose()
        if own_store is not None:
            own_store.close()
    gaps.sort()
    return {"itl_mean_ms": 1e3 * statistics.fmean(gaps), "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
            "itl_p99_ms": 1e3 * gaps[int(len(gaps) * 0.99)], "tok_per_s": tokens / seconds}


def run_tree(view: Path, group: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [sys.executable, "-P", __file__, "--child", str(work), "--group", group, "--concurrency",
           str(args.concurrency), "--max-tokens", str(args.max_tokens), "--requests-per-slot",
           str(args.requests_per_slot)]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(view)}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="source tree to compare against (an export of another commit)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests-per-slot", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return 0
    if args.base is None:
        ap.error("--base is required")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        trees = {"base": package_view(args.base.resolve(), tmp / "base"),
                 "this": package_view(HERE.parent, tmp / "this")}
        port_file = tmp / "group.port"
        group = subprocess.Popen([sys.executable, "-P", str(HERE / "router_cpu.py"), "--fake-group", str(port_file),
                                  "--step-ms", str(args.step_ms)], env={**os.environ, "PYTHONPATH": str(trees["this"])})
        try:
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text()):
                if group.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the fake group did not start")
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text()}"
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for _ in range(args.runs):  # alternating: drift on a shared machine hits both alike
                for name, view in trees.items():
                    results[name].append(run_tree(view, address, args, tmp))
        finally:
            group.kill()
            group.wait()
    print(f"client ITL over RouterCore, {args.concurrency} streams x {args.max_tokens} tokens, a step every "
          f"{args.step_ms} ms, SQLite store; median of {args.runs} alternating runs\n")
    print("| tree | ITL mean ms | ITL p50 ms | ITL p99 ms | tokens/s |\n|---|---|---|---|---|")
    keys = ("itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "tok_per_s")
    med = {name: [statistics.median(r[k] for r in runs) for k in keys] for name, runs in results.items()}
    for name, vals in med.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print(f"\nthis / base: ITL mean x{med['this'][0] / med['base'][0]:.3f}, p99 x{med['this'][2] / med['base'][2]:.3f}, "
          f"tokens/s x{med['this'][3] / med['base'][3]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
