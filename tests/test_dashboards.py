"""The committed dashboards are what k2serve/dashboards.py generates, every panel query names only series the
code exports, and the chart ships them as sidecar-labelled ConfigMaps (plus a PodMonitor where its CRD exists)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, _native

from k2serve import dashboards
from k2serve.operator.pods import METRICS_PORT_NAME

CHART = Path(__file__).resolve().parents[1] / "charts/k2serve"
DOCS = {name: json.loads(text) for name, text in dashboards.render().items()}


def test_committed_dashboards_are_current(tmp_path: Path) -> None:
    assert dashboards.main(["--check"]) == 0, "run: python -m k2serve.dashboards"
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "operator.json").write_text("{}")
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1


def test_every_panel_query_names_exported_metrics() -> None:
    queries = [q for name, doc in DOCS.items() for q in dashboards.panel_queries(name, doc)]
    assert len(queries) >= 30
    assert dashboards.check_dashboards(DOCS, dashboards.exported_series()) == []
    referenced = set().union(*(dashboards.referenced_metrics(q.expr) for q in queries))
    assert {"k2serve_expert_tokens_total", "k2serve_time_to_first_token_seconds_bucket",
            "k2serve_chain_resumes_total", "k2serve_operator_reconciles_total"} <= referenced


def test_a_panel_naming_an_unknown_metric_fails() -> None:
    doc = json.loads(json.dumps(DOCS["operator.json"]))
    doc["panels"][0]["targets"][0]["expr"] = 'sum(rate(k2serve_reconcile_errors_total{job=~"$job"}[5m]))'
    problems = dashboards.check_dashboards({"operator.json": doc}, dashboards.exported_series())
    assert problems == ["operator.json / Managed deployments: unknown metric(s) ['k2serve_reconcile_errors_total'] "
                        "in 'sum(rate(k2serve_reconcile_errors_total{job=~\"$job\"}[5m]))'"]
    doc["panels"][0]["targets"][0]["expr"] = "topk($n, k2serve_operator_managed_deployments)"
    (problem,) = dashboards.check_dashboards({"operator.json": doc}, dashboards.exported_series())
    assert "outside a =~ matcher" in problem


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (le, role) (rate(a_bucket{x=~"$x", y="rate(b)"}[$__rate_interval])))',
     {"a_bucket"}),
    ("sum(a) / on(role) group_left(group) b and c offset 5m > bool 1e3 unless count_values(\"v\", d)",
     {"a", "b", "c", "d"}),
    ("max by (layer) (x:recorded) / scalar(avg(y{layer!=\"0\"}))", {"x:recorded", "y"}),
])
def test_referenced_metrics_parses_promql(expr: str, names: set[str]) -> None:
    assert dashboards.referenced_metrics(expr) == names


def test_dashboards_have_variables_and_the_expert_heatmap() -> None:
    variables = {n: {v["name"] for v in doc["templating"]["list"]} for n, doc in DOCS.items()}
    assert variables["serving-overview.json"] == {"datasource", "role", "group"}
    assert variables["moe-experts.json"] == {"datasource", "instance", "layer"}
    assert len({doc["uid"] for doc in DOCS.values()}) == len(DOCS)
    heat = [p for p in DOCS["moe-experts.json"]["panels"] if p["type"] == "heatmap"]
    assert len(heat) == 1 and heat[0]["repeat"] == "layer"
    assert heat[0]["targets"][0]["format"] == "heatmap" and heat[0]["targets"][0]["legendFormat"] == "{{expert}}"
    for doc in DOCS.values():
        for panel in doc["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def _render(values: dict[str, Any], api_versions: list[str] | None = None) -> list[dict[str, Any]]:
    chart = Chart.load(str(CHART))
    # Chart.render has no api_versions argument; the SDK's native render takes it like `helm template --api-versions`.
    opts = {"name": "k2serve", "namespace": "monitoring", "is_install": True, "api_versions": api_versions or []}
    rendered = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def test_chart_ships_one_labelled_configmap_per_dashboard() -> None:
    maps = [d for d in _render({"dashboards": {"folder": "k2serve"}}) if d["kind"] == "ConfigMap"]
    assert sorted(k for m in maps for k in m["data"]) == sorted(DOCS)
    for cm in maps:
        kubernetes_validate.validate(cm, "1.33.0", strict=True)
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "k2serve"}
        (name, text), = cm["data"].items()
        assert json.loads(text) == DOCS[name]
    assert not [d for d in _render({"dashboards": {"enabled": False}}) if d["kind"] == "ConfigMap"]


def test_podmonitor_only_where_the_prometheus_operator_is() -> None:
    assert not [d for d in _render({}) if d["kind"] == "PodMonitor"]
    with_crd = ["monitoring.coreos.com/v1/PodMonitor"]
    assert not [d for d in _render({"podMonitor": {"enabled": False}}, with_crd) if d["kind"] == "PodMonitor"]
    (monitor,) = [d for d in _render({"podMonitor": {"port": "metrics", "interval": "30s"}}, with_crd)
                  if d["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "k2serve"}


def test_podmonitor_scrapes_the_one_port_the_operator_names_for_it() -> None:
    """One scrape target per pod: the pool controller's port in head pods (named as the operator renders it,
    not KubeRay's "metrics") and the operator's own; worker pods are not scraped (their metrics go through the
    pool controller, and the NetworkPolicy admits only its port)."""
    docs = _render({}, ["monitoring.coreos.com/v1/PodMonitor"])
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == [METRICS_PORT_NAME]
    (components,) = monitor["spec"]["selector"]["matchExpressions"]
    assert components["values"] == ["head", "operator"]
    (operator,) = [d for d in docs if d["kind"] == "Deployment"]
    ports = operator["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [p["name"] for p in ports].count(METRICS_PORT_NAME) == 1


@pytest.mark.parametrize("values", [{"dashboards": {"enabled": "yes"}}, {"podMonitor": {"port": "Metrics_Port"}},
                                    {"podMonitor": {"interval": "soon"}}, {"dashboards": {"extra": 1}}])
def test_chart_refuses_bad_monitoring_values(values: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="(?i)schema|values"):
        _render(values)
