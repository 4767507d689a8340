"""The router process: gRPC `Router` service and the OpenAI HTTP front over one `RouterCore`.

`python -m k2serve.router.process --config PATH --group ID=ROLE@HOST:PORT ...` serves the listed groups;
without `--group` it connects to the Ray cluster (`--ray-address`, default `$RAY_ADDRESS`, e.g. the Ray Client
address `ray://HEAD:10001` that the operator sets on router pods) and follows the pool controller's registry.
It serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable

from k2serve.config import RAY_NAMESPACE, ServingConfig
from k2serve.metrics import Metrics
from k2serve.ray_join import join_ray
from k2serve.router.http.app import create_app
from k2serve.router.http.uvicorn_runner import serving
from k2serve.signals import stop_on_signals
from k2serve.router.core import RouterCore
from k2serve.router.directory import RegistryDirectory
from k2serve.groups import GroupAddress
from k2serve.router.schedule import GroupDirectory, StaticDirectory
from k2serve.router.grpc_api import start_router_server

GROUP_SPEC = re.compile(r"(?P<id>[^=]+)=(?P<role>prefill|decode|both)@(?P<addr>[^:]+:\d+)")
SWITCH_INTERVAL_S = 0.001  # vs Python's 0.005


def parse_group(spec: str) -> GroupAddress:
    m = GROUP_SPEC.fullmatch(spec)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad --group {spec!r}: expected ID=ROLE@HOST:PORT with ROLE one of "
                                         "prefill, decode, both")
    return GroupAddress(m["id"], m["role"], m["addr"])  # type: ignore[arg-type]


async def run_router(config: ServingConfig, directory: GroupDirectory, stop: asyncio.Event,
                     on_ready: Callable[[str, int], None] | None = None, metrics: Metrics | None = None, *,
                     stall_timeout_s: float | None = None) -> None:
    """Serves gRPC and HTTP until `stop` is set; `on_ready(http_url, grpc_port)` once both listen."""
    metrics = metrics or Metrics()
    core = RouterCore(config, directory, metrics, stall_timeout_s=stall_timeout_s)
    grpc_server = None
    try:
        await core.start()
        grpc_server, grpc_port = await start_router_server(core, config.router.host, config.router.grpc_port)
        async with serving(create_app(core, config, metrics), config.router.host, config.router.http_port) as url:
            if on_ready is not None:
                on_ready(url, grpc_port)
            await stop.wait()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        await core.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m k2serve.router.process", description=__doc__)
    ap.add_argument("--config", required=True, help="serving config (YAML or JSON)")
    ap.add_argument("--group", action="append", type=parse_group, default=[], metavar="ID=ROLE@HOST:PORT",
                    help="a worker group's gRPC address (repeat for each group)")
    ap.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                    help="Ray cluster whose pool-controller registry lists the groups (default: $RAY_ADDRESS)")
    ap.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                    help="a group stream silent S seconds after its first token is re-dispatched "
                         "(default: the config's router.stall_timeout_s)")
    args = ap.parse_args(argv)
    if not args.group and not args.ray_address:
        ap.error("give the groups (--group ...) or a Ray cluster to find them in (--ray-address / $RAY_ADDRESS)")
    config = ServingConfig.load(args.config)
    # The event loop waits for the GIL each time it wakes while a thread parses or tokenizes a big request: a
    # shorter switch interval shortens that wait (the router serves streams; it is latency-bound).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    directory: GroupDirectory
    if args.group:
        directory = StaticDirectory(args.group)
    else:
        join_ray(args.ray_address, RAY_NAMESPACE, log_to_driver=False)
        directory = RegistryDirectory(RAY_NAMESPACE)

    def ready(url: str, grpc_port: int) -> None:
        print(f"k2serve router: HTTP {url}/v1  gRPC {config.router.host}:{grpc_port}", flush=True)

    async def go() -> None:
        await run_router(config, directory, stop_on_signals(), ready,
                         stall_timeout_s=args.stall_timeout)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
