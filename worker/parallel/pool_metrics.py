"""The worker groups' Prometheus metrics on one fixed port: the pool controller's `/metrics`.

Each group leader keeps its own registry (and serves it on a port it picks, for local use), but in a cluster
those ports are unknown to Prometheus, and several leaders may share a pod. So the controller, which holds
every leader's handle, fetches each leader's exposition over Ray at scrape time and serves them merged, every
sample labelled `leader=<group id>` (no two leaders' series can collide, also for metrics without a `group`
label, such as the expert-load counters). A leader that does not answer in time is left out of that scrape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from k2serve.scaling import SCALING_PATH

LEADER_LABEL = "leader"


class MergedGroupMetrics(Collector):
    """Collector over `fetch()` → {group id: that leader's text exposition}."""

    def __init__(self, fetch: Callable[[], dict[str, str]]) -> None:
        self.fetch = fetch

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for group_id, text in sorted(self.fetch().items()):
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples += [s._replace(labels={**s.labels, LEADER_LABEL: group_id}) for s in family.samples]
        yield from merged.values()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a log line each
        pass


def serve_group_metrics(fetch: Callable[[], dict[str, str]], port: int, host: str, *,
                        own: CollectorRegistry | None = None, scaling: Callable[[], str] | None = None) -> WSGIServer:
    """Serves the merged exposition (plus the controller's `own` metrics) on http://host:port/metrics and, given
    `scaling` (→ a `ScalingReport` as JSON), the autoscaler's state on `SCALING_PATH`, from a daemon thread
    (`server.server_port` is the bound port; `shutdown()` + `server_close()` stop it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedGroupMetrics(fetch))
    if own is not None:
        registry.register(own)
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if scaling is not None and environ.get("PATH_INFO") == SCALING_PATH:
            body = scaling().encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="k2serve-pool-metrics", daemon=True).start()
    return server
