"""The Grafana dashboard: valid JSON, importable anywhere (datasource variable), showing what an
operator needs, and every PromQL expression naming only metrics the service really exports.
(The integration test also runs every expression against a real Prometheus.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.test_deploy_common import (
    DEPLOY,
    DESIGN_SERIES,
    exported_series_names,
    promql_metric_names,
)

DASHBOARD = DEPLOY / "grafana" / "gptoss-serve.json"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def variable_queries() -> list[str]:
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def label_values_metric(query: str) -> str:
    m = re.fullmatch(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{.*\})?\s*,\s*\w+\s*\)", query)
    assert m, f"unexpected variable query: {query}"
    return m.group(1)


def scraped_series_names(exposition: str) -> frozenset[str]:
    """Series names an exposition defines, from its `# TYPE` lines (labelled counters show no
    samples until first incremented, but their TYPE line is there)."""
    kinds: dict[str, set[str]] = {"histogram": set(), "counter": set(), "gauge": set()}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.M):
        if name.startswith("gptoss_"):
            kinds[kind].add(name if kind != "counter" or name.endswith("_total") else name + "_total")
    return exported_series_names(
        frozenset(kinds["histogram"]), frozenset(kinds["counter"]), frozenset(kinds["gauge"])
    )


def test_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    d = dashboard()
    assert d["uid"] == "gptoss-serve" and d["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24


def test_every_expression_names_only_metrics_from_design_section_8() -> None:
    for expr in expressions():
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= DESIGN_SERIES, (expr, names - DESIGN_SERIES)
    for query in variable_queries():
        assert label_values_metric(query) in DESIGN_SERIES


def test_every_expression_names_only_metrics_the_service_registers() -> None:
    metrics = pytest.importorskip("service.metrics", reason="service.metrics is not there yet")
    real = scraped_series_names(metrics.Metrics().render())
    assert real, "the service's registry exported no gptoss_ metric"
    for expr in expressions():
        assert promql_metric_names(expr) <= real, expr
    for query in variable_queries():
        assert label_values_metric(query) in real


def test_dashboard_shows_what_an_operator_watches() -> None:
    exprs = expressions()

    def shown(metric: str, *fragments: str) -> bool:
        return any(
            metric in promql_metric_names(e) and all(f in e for f in fragments) for e in exprs
        )

    assert shown("gptoss_requests_total", "rate(")  # requests/s
    for hist in ("gptoss_time_to_first_token_seconds", "gptoss_inter_token_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert shown(f"{hist}_bucket", f"histogram_quantile({q},"), (hist, q)
    assert shown("gptoss_generation_tokens_total", "rate(")  # output tokens/s
    assert shown("gptoss_batch_size_sum") and shown("gptoss_batch_size_count")
    assert shown("gptoss_slots_used")
    assert shown("gptoss_num_requests_waiting")  # queue length
    assert shown("gptoss_request_errors_total", "by (code)")  # errors by code
    assert shown("gptoss_step_duration_seconds_bucket", "kind")  # prefill vs decode


def test_scraped_series_names_reads_type_lines() -> None:
    exposition = (
        "# TYPE gptoss_requests_total counter\n# TYPE gptoss_batch_size histogram\n"
        "# TYPE gptoss_slots_used gauge\n# TYPE python_gc_objects_collected_total counter\n"
    )
    assert scraped_series_names(exposition) == {
        "gptoss_requests_total", "gptoss_slots_used", "gptoss_batch_size_bucket",
        "gptoss_batch_size_sum", "gptoss_batch_size_count",
    }
