"""`k2serve operator`: runs the kopf operator with a liveness endpoint and peering (so that of two replicas
only one acts at a time)."""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from pathlib import Path

import kopf

from k2serve.errors import UserError
from k2serve.metrics import Metrics
from k2serve.operator.autoscaling import SCALING_URL, http_scaling
from k2serve.operator.handlers import build_registry
from k2serve.operator.kube import Kube

PEERING_NAME = "k2serve"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2serve operator", description="Run the K2Deployment operator (kopf): "
                                     "reconciles K2Deployments into Ray clusters, routers and their config.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--allowed-image-prefix", action="append", default=[], metavar="PREFIX",
                        help="refuse K2Deployments whose pods would run an image not starting with one of these "
                        "(repeatable, e.g. ghcr.io/k2serve/; default: any image)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL served by kopf")
    parser.add_argument("--peering", default=PEERING_NAME, help="kopf peering object name")
    parser.add_argument("--standalone", action="store_true", help="disable peering (single replica only)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="level-based status refresh period")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (0: any free port; default: not served)")
    parser.add_argument("--scaling-url", default=SCALING_URL,
                        help="where autoscaled deployments' pool controllers report their pools ({ray}: the "
                        "RayCluster's name, {namespace}: its namespace; default: the Ray head's Service)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="used outside a cluster (default: $KUBECONFIG)")
    args = parser.parse_args(argv)
    if args.resync_seconds <= 0:
        parser.error("--resync-seconds must be positive")
    return args


async def operate(args: argparse.Namespace, stop: threading.Event | None = None,
                  ready: threading.Event | None = None) -> None:
    """The operator as a coroutine, so tests can embed it with their own stop/ready flags."""
    metrics = Metrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, host="0.0.0.0")
    await kopf.operator(
        # Exact namespaces need no namespace scanning (patterns do: they match namespaces as they appear).
        registry=build_registry(args.resync_seconds,
                                scan=not args.namespace or any(set(ns) & set("*?[!") for ns in args.namespace)),
        memo=kopf.Memo(kube=Kube.from_environment(args.kubeconfig), metrics=metrics, managed=set(),
                       allowed_images=tuple(args.allowed_image_prefix), scaling=http_scaling(args.scaling_url)),
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        # kopf makes peering mandatory once a name is given, so a standalone run must not pass one.
        peering_name=None if args.standalone else args.peering,
        standalone=args.standalone,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        stop_flag=stop,
        ready_flag=ready,
    )


def ensure_credentials(kubeconfig: str | None) -> None:
    """In a pod the service account is used; elsewhere a kubeconfig must exist (kopf would retry its login forever)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return
    paths = [Path(p).expanduser() for p in (kubeconfig or "~/.kube/config").split(os.pathsep) if p]
    if not any(p.is_file() for p in paths):
        raise UserError(f"no Kubernetes credentials: not in a pod, and no kubeconfig at {', '.join(map(str, paths))}; "
                        "set KUBECONFIG or pass --kubeconfig (in a cluster: helm install k2serve charts/k2serve)")


def main(argv: list[str]) -> int:
    args = parse(argv)
    ensure_credentials(args.kubeconfig)
    kopf.configure(verbose=False)
    asyncio.run(operate(args))
    return 0
