"""The worker groups' Prometheus metrics on one fixed port: the pool controller's `/metrics`.

Each group leader keeps its own registry (and serves it on a port it picks, for local use), but in a cluster
those ports are unknown to Prometheus, and several leaders may share a pod. So the controller, which holds
every leader's handle, fetches each leader's exposition over Ray at scrape time and serves them merged, every
sample labelled `leader=<group id>` (no two leaders' series can collide, also for metrics without a `group`
label, such as the expert-load counters). A leader that does not answer in time is left out of that scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

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


def serve_group_metrics(fetch: Callable[[], dict[str, str]], port: int, host: str) -> WSGIServer:
    """Serves the merged exposition on http://host:port/metrics from a daemon thread (`server.server_port` is
    the bound port; `shutdown()` + `server_close()` stop it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedGroupMetrics(fetch))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
