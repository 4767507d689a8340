"""`k2serve up`: the whole stack on this machine — a local Ray (loopback, no dashboard), the pool controller
with its prefill and decode worker groups (Ray actors, expert-parallel when `--ep` > 1), the router's gRPC
service and the OpenAI HTTP front — until Ctrl-C (SIGINT) or SIGTERM.

The same pool controller runs in the Ray head pod of a cluster (`k2serve pools`); here it runs in this process,
and the router finds the groups through the controller's registry exactly as a router pod does. It also serves
every group's metrics, merged, on one port (as `k2serve pools --metrics-port` does in a cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from k2serve.config import CONFIG_ENV, UP_DEFAULT_MODEL, ServingConfig
from k2serve.cpu_binding import bind_tree
from k2serve.errors import UserError
from k2serve.helptext import summary
from k2serve.k2format.source import resolve_model
from k2serve.localray import init_local_ray
from k2serve.preflight import ensure_port_free
from k2serve.router.directory import RegistryDirectory
from k2serve.router.process import run_router
from k2serve.signals import stop_on_signals


def build_config(args: argparse.Namespace) -> ServingConfig:
    config = ServingConfig.load(args.config) if args.config else ServingConfig.from_env()
    data = config.model_dump()
    if args.model:
        data["model"]["source"] = args.model
    elif not args.config and not os.environ.get(CONFIG_ENV):
        # No config at all: serve the trained agent, so that `k2serve up` then `k2serve agent` answers.
        data["model"]["source"] = UP_DEFAULT_MODEL
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
        data["chain_store"]["sqlite_path"] = str(Path(args.chain_store).resolve())
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as e:
        raise UserError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from e


def preflight(config: ServingConfig) -> None:
    """What a user can get wrong, checked before Ray starts: the model and the ports."""
    try:
        resolve_model(config.model.source)
    except (OSError, ValueError) as e:
        raise UserError(f"model {config.model.source!r}: {e}") from e
    r = config.router
    ensure_port_free(r.host, r.http_port, "the HTTP", "--port")
    ensure_port_free(r.host, r.grpc_port, "the router's gRPC", "router.grpc_port in --config")


def logical_cpus(config: ServingConfig) -> int:
    """Ray places actors by logical CPUs: reserve enough for every rank actor (and the leaders' fractions)
    even on a 2-core laptop; the OS shares the real cores."""
    pools = [config.prefill] if config.router.aggregated else [config.prefill, config.decode]
    wanted = sum(p.most_groups() * p.expert_parallel * p.num_cpus_per_actor for p in pools) + 1
    return max(os.cpu_count() or 1, math.ceil(wanted))


@contextlib.contextmanager
def local_cluster_token(config: ServingConfig) -> Iterator[ServingConfig]:
    """`config` with a cluster token: its own, or a fresh random one in a private (0600) temp file that lives as
    long as the stack — so the local stack's internal gRPC is authenticated too."""
    if config.cluster_token_file is not None:
        yield config
        return
    fd, path = tempfile.mkstemp(prefix="k2serve-cluster-token-")  # mkstemp: 0600, this user only
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        yield config.model_copy(update={"cluster_token_file": path})
    finally:
        os.unlink(path)


async def run(config: ServingConfig) -> None:
    import ray

    from k2serve.worker.parallel.pool_metrics import serve_group_metrics
    from k2serve.worker.parallel.pools import PoolController

    from prometheus_client import generate_latest

    from k2serve.metrics import Metrics

    init_local_ray(logical_cpus(config))
    # The pool controller's news (groups replaced, scaling decisions, drains) on the console with the rest.
    news = logging.StreamHandler(sys.stdout)
    news.setFormatter(logging.Formatter("k2serve up: %(message)s"))
    controller_log = logging.getLogger(PoolController.__module__.rsplit(".", 1)[0])
    controller_log.addHandler(news)
    controller_log.setLevel(logging.INFO)
    stop = stop_on_signals()
    router_metrics = Metrics()  # the router's, read by autoscaled pools for TTFT
    controller = PoolController(config, router_metrics=lambda: generate_latest(router_metrics.registry).decode())
    metrics = None
    try:
        await asyncio.to_thread(controller.start)
        for g in controller.groups():
            print(f"k2serve up: {g['role']} group {g['group_id']} (EP {g['world_size']}) on {g['address']}, "
                  f"metrics on :{g['metrics_port']}", flush=True)
        if controller.cores is not None:  # the router here and Ray's processes off the ranks' cores (cpu_binding.py)
            ranks = [pid for g in controller.groups() for pid in g["rank_pids"]]
            bind_tree(controller.cores.front, skip=ranks)
            plan = "; ".join(f"{gid}: {c.ranks}" for gid, c in controller.cores.groups.items())
            print(f"k2serve up: ranks bound to cores of their own ({plan}); the router, leaders and Ray on "
                  f"{controller.cores.front} (cpu_binding: none turns this off)", flush=True)
        metrics = serve_group_metrics(controller.metrics_texts, 0, config.router.host, own=controller.metrics.registry,
                                      scaling=lambda: controller.scaling().model_dump_json())
        print(f"k2serve up: every group's metrics, merged, at http://{config.router.host}:{metrics.server_port}"
              "/metrics", flush=True)

        def ready(url: str, grpc_port: int) -> None:
            print(f"k2serve up: serving {config.model.source} at {url}/v1 (gRPC {config.router.host}:{grpc_port}); "
                  "Ctrl-C stops", flush=True)

        await run_router(config, RegistryDirectory(controller.namespace), stop, ready, router_metrics)
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        await asyncio.to_thread(controller.stop)
        ray.shutdown()
        controller_log.removeHandler(news)
        print("k2serve up: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve up", description=summary(__doc__))
    ap.add_argument("--model", help="model directory (Hugging Face layout), builtin:tiny-k2-agent or builtin:tiny-k2 "
                    "(default: the config's; without a config builtin:tiny-k2-agent)")
    ap.add_argument("--config", help="serving config file (default: $K2SERVE_CONFIG or built-in defaults)")
    ap.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    ap.add_argument("--ep", type=int, help="expert-parallel actors per group (default 1)")
    ap.add_argument("--prefill-groups", type=int, help="prefill groups (default 1)")
    ap.add_argument("--decode-groups", type=int, help="decode groups (default 1)")
    ap.add_argument("--aggregated", action="store_true", help="one pool does prefill and decode (no KV handoff)")
    ap.add_argument("--chain-store", help="SQLite file of the chain store (default: chains.sqlite3 in the state "
                    "directory, $K2SERVE_STATE_DIR or ~/.local/state/k2serve)")
    args = ap.parse_args(argv)
    config = build_config(args)
    preflight(config)
    with local_cluster_token(config) as config:
        asyncio.run(run(config))
    return 0
