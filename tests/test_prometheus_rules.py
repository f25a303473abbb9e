"""Prometheus config and rules, checked by the real promtool: config syntax, rule syntax, and the
rules' unit tests (deploy/prometheus/tests); plus what ties them to the service and to Kubernetes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_common import DEPLOY, DESIGN_SERIES, promql_metric_names, tool

PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.test.yml"))


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def rules() -> list[dict]:
    return [r for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]
            for r in g["rules"]]


def test_the_project_has_rule_files_and_rule_tests() -> None:
    assert len(RULE_FILES) == 2 and len(RULE_TESTS) == 2


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_promtool_accepts_the_kubernetes_scrape_config_relabelling(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the same job is checked
    with a static target in its place: everything else (relabel rules, rule files) is verified."""
    config = yaml.safe_load((PROM / "scrape-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    path = tmp_path / "scrape-kubernetes.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # prometheus-adapter maps series to pods through these two labels (HPA metric).
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_catch_a_broken_alert(tmp_path: Path) -> None:
    """Loosen one alert's threshold in a copy: its unit test must fail."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in RULE_FILES:
        text = path.read_text().replace("p99_5m > 2\n", "p99_5m > 9\n")
        (tmp_path / "rules" / path.name).write_text(text)
    test_file = tmp_path / "tests" / "alerts.test.yml"
    test_file.write_text((PROM / "tests" / "gptoss-alerts.test.yml").read_text())
    result = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert result.returncode != 0
    assert "GptossTimeToFirstTokenP99High" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts == {
        "GptossTargetDown", "GptossTimeToFirstTokenP99High", "GptossHighErrorRate",
        "GptossQueueGrowing", "GptossNoSlotsFree",
    }
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    tested.add(check["alertname"])
    assert alerts <= tested, alerts - tested


def test_rules_read_only_exported_metrics_and_recorded_series() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = promql_metric_names(rule["expr"]) - DESIGN_SERIES - recorded - {"up"}
        assert not unknown, (rule.get("record") or rule.get("alert"), unknown)


def test_operator_prometheusrule_is_generated_from_the_rule_files() -> None:
    result = subprocess.run(
        [sys.executable, str(PROM / "make_prometheusrule.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    generated = yaml.safe_load(
        (DEPLOY / "k8s/components/monitoring/prometheusrule.yaml").read_text()
    )
    expected = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert generated["spec"]["groups"] == expected
