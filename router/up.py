"""`k2serve up`: the whole stack on this machine — a local Ray (loopback, no dashboard), prefill and decode
worker groups, the router's gRPC service and the OpenAI HTTP front — until Ctrl-C (SIGINT) or SIGTERM.

Worker groups run in this process (`router/local.py`), as Ray's driver, so prefill→decode KV handoffs go
through Ray's object store exactly as between remote groups; the router reaches them over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from k2serve.config import ServingConfig
from k2serve.router.local import start_local_groups
from k2serve.router.schedule import StaticDirectory
from k2serve.router.serve import run_router, stop_on_signals


def build_config(args: argparse.Namespace) -> ServingConfig:
    config = ServingConfig.load(args.config) if args.config else ServingConfig.from_env()
    data = config.model_dump()
    if args.model:
        data["model"]["source"] = args.model
    data["router"]["http_port"] = args.port if args.port is not None else data["router"]["http_port"]
    data["router"]["host"] = args.host or data["router"]["host"]
    if args.aggregated:
        data["router"]["aggregated"] = True
    for pool, n in (("prefill", args.prefill_groups), ("decode", args.decode_groups)):
        if n is not None:
            data[pool]["groups"] = n
    if args.ep is not None:
        data["prefill"]["expert_parallel"] = data["decode"]["expert_parallel"] = args.ep
    if args.chain_store:
        data["chain_store"]["sqlite_path"] = str(Path(args.chain_store))
    return ServingConfig.model_validate(data)


async def run(config: ServingConfig) -> None:
    import ray

    for pool in (config.prefill, config.decode):
        if pool.expert_parallel > 1:
            raise SystemExit("k2serve up: --ep > 1 needs expert-parallel groups from the pool controller "
                             "(k2serve.worker.parallel), which this build's `up` does not start yet")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    stop = stop_on_signals()
    groups = []
    try:
        groups = await start_local_groups(config)
        for g in groups:
            print(f"k2serve up: {g.service.role} group {g.service.group_id} on {g.address}", flush=True)

        def ready(url: str, grpc_port: int) -> None:
            print(f"k2serve up: serving {config.model.source} at {url}/v1 (gRPC {config.router.host}:{grpc_port}); "
                  "Ctrl-C stops", flush=True)

        await run_router(config, StaticDirectory([g.group_address for g in groups]), stop, ready)
    finally:
        for g in groups:
            await g.stop()
        ray.shutdown()
        print("k2serve up: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve up", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory or builtin:tiny-k2 (default: the config's)")
    ap.add_argument("--config", help="serving config file (default: $K2SERVE_CONFIG or built-in defaults)")
    ap.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    ap.add_argument("--ep", type=int, help="expert-parallel actors per group")
    ap.add_argument("--prefill-groups", type=int, help="prefill groups (default 1)")
    ap.add_argument("--decode-groups", type=int, help="decode groups (default 1)")
    ap.add_argument("--aggregated", action="store_true", help="one pool does prefill and decode (no KV handoff)")
    ap.add_argument("--chain-store", help="SQLite file of the chain store")
    args = ap.parse_args(argv)
    try:
        config = build_config(args)
    except ValueError as e:
        print(f"k2serve up: {e}", file=sys.stderr)
        return 2
    asyncio.run(run(config))
    return 0
