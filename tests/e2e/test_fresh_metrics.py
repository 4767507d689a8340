"""A fresh `k2serve up`, before any request or fault, already exports every `k2serve_*` series the shipped
dashboards query (labelled counters at 0), so a healthy stack's panels show 0 rather than "No data". The
operator's series come from its own process; a fresh operator registry is checked the same way."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import yaml
from helpers.up import k2serve_up
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from k2serve import dashboards
from k2serve.metrics import Metrics

QUERIED = {m for name, text in dashboards.render().items()
           for q in dashboards.panel_queries(name, json.loads(text))
           for m in dashboards.referenced_metrics(q.expr) if m.startswith("k2serve_")}
OPERATOR = {m for m in QUERIED if m.startswith("k2serve_operator_")}


def samples(text: str) -> set[str]:
    """Series names present in an exposition, with at least one sample each."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_fresh_stack_exports_every_series_the_dashboards_query(tmp_path: Path) -> None:
    config = tmp_path / "up.yaml"
    config.write_text(yaml.safe_dump({"router": {"http_port": 0},
                                      "chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}}))
    with k2serve_up(config, tmp_path) as stack:
        deadline = time.monotonic() + 30
        while True:  # the groups publish their series on their first export (every 0.5 s)
            exported = samples(httpx.get(f"{stack.url}/metrics").text) | samples(
                httpx.get(f"http://{stack.metrics}/metrics").text)
            missing = QUERIED - OPERATOR - exported
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        chat = httpx.get(f"{stack.url}/metrics").text
    assert missing == set()
    assert 'k2serve_chain_resumes_total{cause="group"} 0.0' in chat  # labelled, at 0 before any event
    assert len(QUERIED) > 20 and OPERATOR


def test_a_fresh_operator_registry_exports_every_operator_series_the_dashboards_query() -> None:
    assert OPERATOR - samples(generate_latest(Metrics().registry).decode()) == set()
