"""Failover benchmark: time from a worker group's death to the first resumed token the reader receives.

Two aggregated groups in this process; configured faults (`kill_group`) kill whichever group streams the turn
every `--every` tokens (the group dies right after sending that token; it restarts 0.2 s later, as a pod would),
so one long deterministic turn fails over `--kills` times. A failover's time is the gap between the last token
before the kill and the first after it, at the router's reader (the kill lands right after the former). The
resumed turn is checked against a fault-free run of the same request.

    python bench/failover.py [--kills 20] [--smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.stack.inproc import LocalStack, start_local_stack
from k2serve.worker.parallel.inproc_group import start_inprocess_groups
from k2serve.router.core import RouterCore
from k2serve.router.schedule import StaticDirectory
from k2serve.worker.engine.sampling import SamplingParams

PROMPT = [(7 * i + 3) % 500 for i in range(200)]


async def run(kills: int, every: int, workdir: Path) -> dict[str, object]:
    # A group's every stint ends with a kill after `every` tokens, whichever group serves it: one kill per
    # `every` tokens of the turn, `kills` of them before its last token.
    faults = [{"kind": "kill_group", "pool": "prefill", "group": g, "after_tokens": every, "times": kills}
              for g in (0, 1)]
    cfg = ServingConfig.model_validate({
        "deterministic": True, "router": {"aggregated": True}, "prefill": {"groups": 2}, "faults": faults,
        "chain_store": {"sqlite_path": str(workdir / "chains.sqlite3"), "migration_limit": kills + 1}})
    groups = await start_inprocess_groups(cfg, restart_after_s=0.2)
    metrics = Metrics()
    core = RouterCore(cfg, StaticDirectory([g.group_address for g in groups]), metrics)
    stack = LocalStack(core, groups)
    n = every * (kills + 1)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=n, ignore_eos=True)
    try:
        await core.start()
        times: list[float] = []
        failovers: list[float] = []
        tokens: list[int] = []
        migrated = 0.0
        async for tok in core.generate(PROMPT, params):
            times.append(time.perf_counter())
            tokens.append(tok.token)
            now = metrics.registry.get_sample_value("k2serve_migrations_total") or 0.0
            if now > migrated and len(times) > 1:
                failovers.append(times[-1] - times[-2])
            migrated = now
        itl = statistics.median(b - a for a, b in zip(times, times[1:]))
    finally:
        await stack.aclose()
    reference = await fault_free(cfg.model_copy(update={"faults": []}), workdir, params)
    return {"kills": len(failovers), "tokens": len(tokens), "identical": tokens == reference,
            "failover_p50_s": statistics.median(failovers), "failover_max_s": max(failovers),
            "itl_p50_s": itl}


async def fault_free(cfg: ServingConfig, workdir: Path, params: SamplingParams) -> list[int]:
    cfg = cfg.model_copy(update={"chain_store": cfg.chain_store.model_copy(
        update={"sqlite_path": str(workdir / "reference.sqlite3")})})
    stack = await start_local_stack(cfg)
    try:
        return [t.token async for t in stack.core.generate(PROMPT, params)]
    finally:
        await stack.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--every", type=int, default=16, help="tokens a group streams before it is killed")
    ap.add_argument("--smoke", action="store_true", help="3 kills (the test suite's check that it runs)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    kills = 3 if args.smoke else args.kills
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(kills, args.every, Path(tmp)))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result))
    if not result["identical"] or result["kills"] != kills:
        raise SystemExit(f"failover run wrong: {result}")


if __name__ == "__main__":
    main()
