"""`k2serve pools`: the pool controller (pools.py) as a process of its own — a Ray driver in the Ray head pod of a
cluster — until SIGINT or SIGTERM; with `--metrics-port` it serves every group's metrics, merged, and the
autoscaling report (`/autoscaling`) there."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import urllib.request
from collections.abc import Callable

import ray

from k2serve.config import RAY_NAMESPACE as NAMESPACE
from k2serve.config import ServingConfig
from k2serve.helptext import summary
from k2serve.localray import init_local_ray
from k2serve.ray_join import join_ray
from k2serve.worker.parallel.pool_metrics import serve_group_metrics
from k2serve.worker.parallel.pools import CALL_TIMEOUT_S, PoolController


def _http_text(url: str) -> Callable[[], str]:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as response:
            return str(response.read().decode())
    return fetch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve pools", description=summary(__doc__))
    ap.add_argument("--config", help="serving config file (default: $K2SERVE_CONFIG or built-in defaults)")
    ap.add_argument("--address", help="the Ray cluster to join, HOST:PORT (default: $RAY_ADDRESS, else the "
                    "cluster last started on this machine)")
    ap.add_argument("--local", action="store_true", help="start a local Ray (loopback, no dashboard) instead of "
                    "joining a cluster")
    ap.add_argument("--wait-for-ray", type=float, default=0.0, metavar="S",
                    help="keep trying to join the cluster this long (a pod may start before the Ray head; default 0)")
    ap.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace of leaders and registry ({NAMESPACE})")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="serve every group's metrics, merged, on this port's /metrics (default: not served)")
    ap.add_argument("--metrics-host", default="127.0.0.1", help="address to serve metrics on (127.0.0.1)")
    ap.add_argument("--router-metrics", metavar="URL", help="the routers' /metrics (e.g. their Service), read for "
                    "pools that scale on TTFT (autoscaling.ttft_slo_s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServingConfig.load(args.config) if args.config else ServingConfig.from_env()
    if args.local:
        init_local_ray()
    else:
        join_ray(args.address, args.namespace, wait_s=args.wait_for_ray, hint=(
            "start one with `ray start --head`, pass --address HOST:PORT of a running cluster, or use --local for a "
            "Ray of its own on this machine"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    controller = PoolController(config, namespace=args.namespace,
                                router_metrics=_http_text(args.router_metrics) if args.router_metrics else None)
    server = None
    try:
        controller.start()
        if args.metrics_port is not None:
            server = serve_group_metrics(controller.metrics_texts, args.metrics_port, args.metrics_host,
                                         own=controller.metrics.registry,
                                         scaling=lambda: controller.scaling().model_dump_json())
        for g in controller.groups():
            print(json.dumps(g), flush=True)
        stop.wait()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        controller.stop()
        ray.shutdown()
    return 0
