"""Grafana dashboards for k2serve, built with Grafana's foundation SDK and written as JSON for the Helm chart.

Four dashboards: serving overview (SLOs, throughput, saturation), MoE experts (per-layer expert-load heatmaps,
imbalance), reasoning chains (checkpoints, resumes, failover, tool calls) and the operator. Every query names
only series that `k2serve.metrics.Metrics` exports; `check_dashboards` proves it before anything is written,
and tests evaluate every query against a real Prometheus scraping the local stack.

`python -m k2serve.dashboards [--out DIR] [--check]` writes (or checks) `charts/k2serve/dashboards/*.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat
from prometheus_client.metrics_core import Metric

from k2serve.metrics import Metrics

CHART_DASHBOARDS = Path(__file__).resolve().parents[1] / "charts/k2serve/dashboards"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count", "_created")}
# Grafana's dashboard grid is 24 columns wide.
HALF, THIRD = 12, 8

PanelBuilder = Builder[dm.Panel]


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL expression of one panel, as the tests evaluate it."""

    dashboard: str
    panel: str
    expr: str


def _q(expr: str, legend: str = "__auto", fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES,
       instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).format(fmt)
    return query.instant() if instant else query.range()


def _sel(metric: str, labels: str = 'role=~"$role", group=~"$group"') -> str:
    return f"{metric}{{{labels}}}"


def _quantiles(histogram: str, by: str = "", labels: str = "") -> list[prometheus.Dataquery]:
    """p50/p90/p99 of a histogram's recent observations (optionally per label set)."""
    group = f"le, {by}" if by else "le"
    legend = f"p{{q}} {{{{{by}}}}}" if by else "p{q}"
    selector = f"{histogram}_bucket{{{labels}}}" if labels else f"{histogram}_bucket"
    return [_q(f"histogram_quantile({q}, sum by ({group}) (rate({selector}[{RATE}])))",
               legend.format(q=int(q * 100))) for q in (0.5, 0.9, 0.99)]


def _timeseries(title: str, unit: str, queries: list[prometheus.Dataquery], description: str,
                width: int = HALF) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for query in queries:
        panel = panel.with_target(query)
    return panel.span(width).height(8)


def _stat(title: str, unit: str, expr: str, description: str) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
            .with_target(_q(expr, instant=True)).span(THIRD).height(4))


def _var(name: str, query: str, label: str,
         sort: dm.VariableSort = dm.VariableSort.ALPHABETICAL_ASC) -> gd.QueryVariable:
    """A multi-select variable over a label's values, defaulting to All (`.*` in regex matchers)."""
    return (gd.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all")))


def _dashboard(uid: str, title: str, description: str, variables: list[gd.QueryVariable]) -> gd.Dashboard:
    board = (gd.Dashboard(title).uid(uid).description(description).tags(["k2serve"]).refresh("30s")
             .time("now-1h", "now").timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
             .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus")))
    for variable in variables:
        board = board.with_variable(variable)
    return board


def _pool_vars() -> list[gd.QueryVariable]:
    return [_var("role", "label_values(k2serve_running_sequences, role)", "Role"),
            _var("group", 'label_values(k2serve_running_sequences{role=~"$role"}, group)', "Group")]


def serving_overview() -> gd.Dashboard:
    by = "role, group"
    restarts = _sel("k2serve_worker_group_restarts_total", 'role=~"$role"')  # per role: no group label
    return (_dashboard("k2serve-serving", "k2serve / Serving overview",
                       "SLOs, throughput and saturation of the router and the worker groups.", _pool_vars())
            .with_row(gd.Row("SLOs"))
            .with_panel(_timeseries("Time to first token", "s", _quantiles("k2serve_time_to_first_token_seconds"),
                                    "Request arrival at the router to its first streamed token.", THIRD))
            .with_panel(_timeseries("Inter-token latency", "s", _quantiles("k2serve_inter_token_latency_seconds"),
                                    "Gap between consecutive tokens streamed to a client.", THIRD))
            .with_panel(_timeseries("End-to-end latency", "s", _quantiles("k2serve_request_duration_seconds"),
                                    "Request arrival to last token.", THIRD))
            .with_panel(_timeseries("Requests by outcome", "reqps",
                                    [_q(f"sum by (endpoint, outcome) (rate(k2serve_requests_total[{RATE}]))",
                                        "{{endpoint}} {{outcome}}")],
                                    "Finished requests per second, by endpoint and outcome."))
            .with_panel(_timeseries("KV handoffs", "ops",
                                    [_q(f"sum by (outcome) (rate(k2serve_kv_handoffs_total[{RATE}]))", "{{outcome}}")],
                                    "Prefill-to-decode KV handoffs: ok, or fallback to re-prefill on decode."))
            .with_row(gd.Row("Throughput"))
            .with_panel(_timeseries("Router tokens", "short",
                                    [_q(f"sum(rate(k2serve_prompt_tokens_total[{RATE}]))", "prompt"),
                                     _q(f"sum(rate(k2serve_generation_tokens_total[{RATE}]))", "generated")],
                                    "Prompt tokens received and tokens streamed per second."))
            .with_panel(_timeseries("Worker tokens", "short", [
                _q(f"sum by ({by}) (rate({_sel('k2serve_prefill_tokens_total')}[{RATE}]))",
                   "prefill {{role}}/{{group}}"),
                _q(f"sum by ({by}) (rate({_sel('k2serve_decode_tokens_total')}[{RATE}]))", "decode {{role}}/{{group}}"),
                _q(f"sum by ({by}) (rate({_sel('k2serve_prefix_cache_hit_tokens_total')}[{RATE}]))",
                   "prefix hit {{role}}/{{group}}")],
                "Prompt tokens computed, tokens decoded and prompt tokens served from the prefix cache, per second."))
            .with_row(gd.Row("Saturation"))
            .with_panel(_timeseries("Queue depth", "short",
                                    [_q(f"sum by ({by}) ({_sel('k2serve_queue_depth')})", "{{role}}/{{group}}"),
                                     _q("sum(k2serve_router_inflight_requests)", "router in flight")],
                                    "Sequences waiting for admission per group, and requests the routers serve.",
                                    THIRD))
            .with_panel(_timeseries("Running sequences", "short",
                                    [_q(f"sum by ({by}) ({_sel('k2serve_running_sequences')})", "{{role}}/{{group}}")],
                                    "Sequences in the running batch per group.", THIRD))
            .with_panel(_timeseries("KV blocks used", "percentunit", [
                _q(f"sum by ({by}) ({_sel('k2serve_kv_blocks_used')}) / (sum by ({by}) "
                   f"({_sel('k2serve_kv_blocks_used')}) + sum by ({by}) ({_sel('k2serve_kv_blocks_free')}))",
                   "{{role}}/{{group}}")],
                "Fraction of each group's KV cache blocks in use (free includes evictable prefix blocks).", THIRD))
            .with_panel(_timeseries("Worker groups healthy", "short",
                                    [_q(f"sum by (role) ({_sel('k2serve_worker_group_healthy')})", "{{role}}")],
                                    "Groups serving, per role (a failed group reports 0 until it is rebuilt).",
                                    THIRD))
            .with_panel(_timeseries("Worker group restarts", "short",
                                    [_q(f"sum by (role) (increase({restarts}[{RATE}]))", "{{role}}")],
                                    "Groups rebuilt by their leader after a rank died or a collective failed.",
                                    THIRD))
            .with_panel(_timeseries("All-to-all traffic", "Bps",
                                    [_q(f"sum by ({by}) (rate({_sel('k2serve_all_to_all_bytes_total')}[{RATE}]))",
                                        "{{role}}/{{group}}")],
                                    "Bytes per second moved by expert-parallel all-to-all inside each group.",
                                    THIRD)))


def _expert_rate(by: str) -> str:
    return (f'sum by ({by}) (rate(k2serve_expert_tokens_total{{instance=~"$instance", layer=~"$layer"}}'
            f"[{RATE}]))")


def moe_experts() -> gd.Dashboard:
    per_expert = _expert_rate("layer, expert")
    load_heatmap = (heatmap.Panel().title("Expert load, layer $layer").datasource(DATASOURCE)
                    .description("Tokens per second routed to each expert of the layer, relative to the layer's "
                                 "mean expert (1 = perfectly balanced; dark rows are cold experts, bright rows hot).")
                    .with_target(_q(f"{_expert_rate('expert')} / scalar(avg({_expert_rate('expert')}))",
                                    "{{expert}}", PromQueryFormat.HEATMAP))
                    .calculate(False).rows_frame(heatmap.RowsHeatmapOptions().value("load / mean"))
                    .color(heatmap.HeatmapColorOptions().scheme("Turbo").steps(64))
                    .y_axis(heatmap.YAxisConfig().axis_label("expert")).show_tooltip()
                    .repeat("layer").repeat_direction("h").span(HALF).height(10))
    return (_dashboard("k2serve-moe", "k2serve / MoE experts",
                       "Expert routing load per MoE layer: hot and cold experts, imbalance, all-to-all traffic.",
                       [_var("instance", "label_values(k2serve_expert_tokens_total, instance)", "Worker group"),
                        _var("layer", 'label_values(k2serve_expert_tokens_total{instance=~"$instance"}, layer)',
                             "MoE layer", dm.VariableSort.NUMERICAL_ASC)])
            .with_row(gd.Row("Imbalance"))
            .with_panel(_timeseries("Max / mean expert load", "short",
                                    [_q(f"max by (layer) ({per_expert}) / avg by (layer) ({per_expert})",
                                        "layer {{layer}}")],
                                    "Per layer: the hottest expert's token rate over the mean expert's "
                                    "(1 = balanced; the top-k fan-out saturates on the hottest expert)."))
            .with_panel(_timeseries("Min / mean expert load", "short",
                                    [_q(f"min by (layer) ({per_expert}) / avg by (layer) ({per_expert})",
                                        "layer {{layer}}")],
                                    "Per layer: the coldest expert's token rate over the mean (0 = an expert "
                                    "collapsed and receives nothing)."))
            .with_panel(table.Panel().title("Hottest experts").datasource(DATASOURCE).span(HALF).height(8)
                        .description("The ten (layer, expert) pairs with the most routed tokens per second.")
                        .with_target(_q(f"topk(10, {per_expert})", fmt=PromQueryFormat.TABLE, instant=True)))
            .with_panel(_timeseries("Routed tokens per layer", "short",
                                    [_q(_expert_rate("layer"), "layer {{layer}}")],
                                    "Tokens per second entering each MoE layer times top-k (slots routed)."))
            .with_row(gd.Row("Expert load heatmaps"))
            .with_panel(load_heatmap))


def reasoning_chains() -> gd.Dashboard:
    return (_dashboard("k2serve-chains", "k2serve / Reasoning chains",
                       "Durable agent chains: checkpoints, resumes, migrations after failures, tool calls.", [])
            .with_panel(_timeseries("Checkpoints written", "ops",
                                    [_q(f"sum(rate(k2serve_chain_checkpoints_total[{RATE}]))", "checkpoints")],
                                    "Durable chain appends written to the chain store per second."))
            .with_panel(_timeseries("Resumes by cause", "short",
                                    [_q(f"sum by (cause) (increase(k2serve_chain_resumes_total[{RATE}]))",
                                        "{{cause}}")],
                                    "Chains resumed from the store, by cause (client reconnect, router or group "
                                    "failure)."))
            .with_panel(_timeseries("Migrations", "short",
                                    [_q(f"sum(increase(k2serve_migrations_total[{RATE}]))", "migrations")],
                                    "Generations re-dispatched to another worker group mid-stream."))
            .with_panel(_timeseries("Failover time", "s", _quantiles("k2serve_failover_seconds"),
                                    "Failure detected to the first resumed token the client receives."))
            .with_panel(_timeseries("Tool calls per chain", "short",
                                    _quantiles("k2serve_tool_calls_per_chain")
                                    + [_q(f"sum(rate(k2serve_tool_calls_per_chain_sum[{RATE}])) / "
                                          f"sum(rate(k2serve_tool_calls_per_chain_count[{RATE}]))", "mean")],
                                    "Tool calls in each chain turn's history (agent chains run 200-300).")))


def operator() -> gd.Dashboard:
    return (_dashboard("k2serve-operator", "k2serve / Operator", "The K2Deployment operator's reconcile loop.", [])
            .with_panel(_stat("Managed deployments", "short", "sum(k2serve_operator_managed_deployments)",
                              "K2Deployments the active operator replica manages."))
            .with_panel(_timeseries("Reconciles by outcome", "ops",
                                    [_q(f"sum by (outcome) (rate(k2serve_operator_reconciles_total[{RATE}]))",
                                        "{{outcome}}")],
                                    "Reconciles per second, by outcome."))
            .with_panel(_timeseries("Reconcile latency", "s", _quantiles("k2serve_operator_reconcile_duration_seconds"),
                                    "Time one reconcile of a K2Deployment takes.")))


DASHBOARDS: dict[str, Callable[[], gd.Dashboard]] = {
    "serving-overview": serving_overview, "moe-experts": moe_experts,
    "reasoning-chains": reasoning_chains, "operator": operator,
}


def render() -> dict[str, str]:
    """File name -> dashboard JSON text, deterministic so the committed files can be compared."""
    return {f"{name}.json": json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def panel_queries(name: str, doc: dict[str, Any]) -> Iterator[PanelQuery]:
    for panel in doc.get("panels", []):
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                yield PanelQuery(name, sub.get("title", ""), target["expr"])


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan"}


def referenced_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names, labels, keywords and strings excluded)."""
    text = _STRING.sub('""', expr)
    text = _LABEL_LIST.sub("", _RANGE.sub("", _MATCHERS.sub("", text)))
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def exported_series(metrics: Metrics | None = None) -> set[str]:
    """Every series name the `Metrics` registry can expose (histogram/counter suffixes included)."""
    families: list[Metric] = list((metrics or Metrics()).registry.collect())
    return {f.name + suffix for f in families for suffix in SERIES_SUFFIXES[f.type]}


def check_dashboards(docs: dict[str, dict[str, Any]], exported: set[str]) -> list[str]:
    """Problems found: a query naming a series the code does not export, or a variable outside a regex matcher."""
    problems = []
    for name, doc in docs.items():
        for pq in panel_queries(name, doc):
            unknown = referenced_metrics(pq.expr) - exported
            if unknown:
                problems.append(f"{name} / {pq.panel}: unknown metric(s) {sorted(unknown)} in {pq.expr!r}")
            bare = re.sub(r'=~"\$\w+"|\$__rate_interval', "", pq.expr)
            if "$" in bare:
                problems.append(f"{name} / {pq.panel}: template variable outside a =~ matcher in {pq.expr!r}")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve dashboards", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHART_DASHBOARDS, help="directory for the JSON files")
    parser.add_argument("--check", action="store_true", help="fail if the files in --out are not current")
    args = parser.parse_args(argv)
    files = render()
    problems = check_dashboards({n: json.loads(t) for n, t in files.items()}, exported_series())
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if args.check:
        stale = sorted(n for n, t in files.items()
                       if not (args.out / n).is_file() or (args.out / n).read_text() != t)
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in files)
        if stale or extra:
            print(f"stale: {stale}; not generated: {extra} — run python -m k2serve.dashboards", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(files)} dashboards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
