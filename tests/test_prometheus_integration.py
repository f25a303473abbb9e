"""A real Prometheus scraping the real service: `gptoss-serve serve` (built-in tiny model, CPU) and
Debian's `prometheus`, both on 127.0.0.1 with free ports, the project's scrape config and rules.
After a few requests, Prometheus's HTTP API must report exactly the requests and tokens sent, the
recording rules must evaluate, and every dashboard expression must run and return data."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.test_deploy_common import DEPLOY, DESIGN_SERIES, ROOT, promql_metric_names, tool
from tests.test_deploy_dashboard import expressions, scraped_series_names, variable_queries

PROM = DEPLOY / "prometheus"
JOB = "gptoss-serve"
K8S_JOB = "gptoss-serve-k8s-relabel"
# Unary requests and one stream, each generating exactly max_new_tokens (ignore_eos), plus one
# invalid request (empty prompt) that must show up as an error, not as a request.
UNARY_REQUESTS = 3
UNARY_TOKENS = 5
STREAM_TOKENS = 4
WAIT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    """Poll `probe` until it returns something truthy; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class Stack:
    grpc_port: int
    metrics_port: int
    prom_url: str
    server: subprocess.Popen
    prometheus: subprocess.Popen
    baseline: dict[str, float]  # the service's own counters before the test's traffic
    sent: dict[str, float]  # what the test's traffic added

    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.prom_url, expr)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.prom_url}{path}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.read().decode()


def query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API; the result vector."""
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def sample_total(exposition: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in an exposition."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(exposition))


def start_server(tmp: Path) -> tuple[subprocess.Popen, int, int]:
    port_file = tmp / "ports.json"
    cmd = [
        sys.executable, "-m", "service.cli", "serve",
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
        "--device", "cpu", "--dtype", "float32", "--max-slots", "2", "--grace-period", "10",
    ]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def ports() -> dict[str, int] | None:
        assert proc.poll() is None, f"server exited: {(tmp / 'server.log').read_text()}"
        return json.loads(port_file.read_text()) if port_file.exists() else None

    found = wait_for("the server's port file", ports)
    return proc, int(found["port"]), int(found["metrics_port"])


def prometheus_config(tmp: Path, metrics_port: int) -> Path:
    """The project's prometheus.yml pointed at the test's server, scraping every second, plus the
    Kubernetes job of scrape-kubernetes.yml fed by a file standing in for pod discovery."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]

    (k8s_job,) = yaml.safe_load((PROM / "scrape-kubernetes.yml").read_text())["scrape_configs"]
    k8s_job.pop("kubernetes_sd_configs")
    pods = [
        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {
            "__meta_kubernetes_namespace": "gptoss",
            "__meta_kubernetes_pod_name": "gptoss-serve-7d9f-abcde",
            "__meta_kubernetes_pod_node_name": "gpu-node-1",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "gptoss-serve",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
            "__meta_kubernetes_pod_container_port_name": "metrics",
        }},
        # The same pod's gRPC port and an unrelated pod: both must be dropped by the relabelling.
        {"targets": ["127.0.0.1:1"], "labels": {
            "__meta_kubernetes_namespace": "gptoss",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "gptoss-serve",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_container_port_name": "grpc",
        }},
        {"targets": ["127.0.0.1:2"], "labels": {
            "__meta_kubernetes_namespace": "other",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "something-else",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_container_port_name": "metrics",
        }},
    ]
    (tmp / "pods.json").write_text(json.dumps(pods))
    k8s_job.update(job_name=K8S_JOB, scrape_interval="1s", scrape_timeout="1s",
                   file_sd_configs=[{"files": [str(tmp / "pods.json")]}])
    config["scrape_configs"].append(k8s_job)
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(tmp: Path, config: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited: {(tmp / 'prometheus.log').read_text()}"
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as reply:
            return reply.status == 200

    wait_for("prometheus to be ready", ready)
    return proc, url


def send_traffic(grpc_port: int) -> dict[str, float]:
    from proto.gptoss.v1 import generate_pb2 as pb
    from service.client import GenerationClient

    generated = 0
    with GenerationClient(f"127.0.0.1:{grpc_port}", timeout=120) as client:
        for i in range(UNARY_REQUESTS):
            reply = client.generate(f"hello prometheus {i}", max_new_tokens=UNARY_TOKENS,
                                    ignore_eos=True, temperature=0.0)
            assert reply.finish_reason == pb.LENGTH
            assert reply.usage.completion_tokens == UNARY_TOKENS
            generated += reply.usage.completion_tokens
        streamed = list(client.stream("a streamed one", max_new_tokens=STREAM_TOKENS,
                                      ignore_eos=True, temperature=0.0))
        assert streamed[-1].usage.completion_tokens == STREAM_TOKENS
        generated += sum(len(m.token_ids) for m in streamed)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("", max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {"requests": UNARY_REQUESTS + 1, "generation_tokens": generated, "errors": 1}


COUNTED = {
    "requests": "gptoss_requests_total",
    "ttft": "gptoss_time_to_first_token_seconds_count",
    "generation_tokens": "gptoss_generation_tokens_total",
    "errors": "gptoss_request_errors_total",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = tool("prometheus")  # fail/skip before starting anything
    assert prometheus_bin
    tmp = tmp_path_factory.mktemp("prometheus-it")
    server, grpc_port, metrics_port = start_server(tmp)
    prometheus = None
    try:
        wait_for("the server to report SERVING", lambda: health(grpc_port) == "SERVING")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = urllib.request.urlopen(url, timeout=10).read().decode()
        baseline = {k: sample_total(before, name) for k, name in COUNTED.items()}
        prometheus, prom_url = start_prometheus(tmp, prometheus_config(tmp, metrics_port))
        # Rates need a sample from before the traffic: wait for the first scrape.
        wait_for("the first scrape", lambda: query(prom_url, f'up{{job="{JOB}"}} == 1'))
        sent = send_traffic(grpc_port)
        sent["ttft"] = sent["requests"]
        yield Stack(grpc_port, metrics_port, prom_url, server, prometheus, baseline, sent)
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(server)
        for name in ("server.log", "prometheus.log"):
            log = tmp / name
            if log.exists() and os.environ.get("GPTOSS_SHOW_LOGS"):
                print(f"--- {name}\n{log.read_text()}")


def health(grpc_port: int) -> str:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), "--port", str(grpc_port),
         "--service", "gptoss.v1.Generation"],
        capture_output=True, text=True, timeout=30,
    )
    return result.stdout.strip()


def test_prometheus_scrapes_the_service_and_counts_exactly_what_was_sent(stack: Stack) -> None:
    def counts() -> dict[str, float] | None:
        got = {k: stack.value(f'sum({name}{{job="{JOB}"}})') for k, name in COUNTED.items()}
        want = {k: stack.baseline[k] + stack.sent[k] for k in COUNTED}
        return got if got == want else None

    wait_for(f"Prometheus to see {stack.sent} on top of {stack.baseline}", counts)
    (up,) = stack.query(f'up{{job="{JOB}"}}')
    assert up["value"][1] == "1"
    (error,) = stack.query(f'gptoss_request_errors_total{{job="{JOB}"}} > 0')
    assert error["metric"]["code"] == "INVALID_ARGUMENT"
    reasons = {r["metric"]["finish_reason"] for r in stack.query(f'gptoss_requests_total{{job="{JOB}"}} > 0')}
    assert reasons == {"length"}


def test_recording_and_alert_rules_evaluate_without_errors(stack: Stack) -> None:
    rate = wait_for(
        "the output tokens/s recording rule",
        lambda: stack.query(f'job:gptoss_generation_tokens:rate1m{{job="{JOB}"}}'),
    )
    assert float(rate[0]["value"][1]) >= 0
    wait_for("a TTFT percentile", lambda: stack.query(
        f'job:gptoss_time_to_first_token_seconds:p99_5m{{job="{JOB}"}}'))

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in stack.api("/api/v1/rules")["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_for("every rule to be evaluated once", evaluated)
    assert len(rules) == 21
    bad = {(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"}
    assert not bad
    # A healthy tiny server with an idle queue raises nothing.
    firing = [a for a in stack.api("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert not firing


def test_every_dashboard_expression_runs_and_returns_data(stack: Stack) -> None:
    # rate() needs two samples; labelled counters appear only at their first increment.
    for metric in ("gptoss_request_errors_total", "gptoss_requests_total"):
        wait_for(f"two samples of {metric}", lambda m=metric: stack.query(
            f'count_over_time({m}{{job="{JOB}"}}[5m]) >= 2'))
    wait_for("scrapes after the traffic", lambda: stack.query(
        f'sum(increase(gptoss_generation_tokens_total{{job="{JOB}"}}[5m])) > 0'))
    empty = []
    for expr in expressions():
        promql = (expr.replace("$__rate_interval", "1m").replace("$job", JOB)
                  .replace("$instance", ".*"))
        if not stack.query(promql):
            empty.append(promql)
    assert not empty
    for query in variable_queries():
        metric = promql_metric_names(query.replace("label_values", "").replace(", job", "")
                                     .replace(", instance", "")).pop()
        series = stack.api("/api/v1/series?" + urllib.parse.urlencode({"match[]": metric}))
        assert {s["job"] for s in series} >= {JOB}


def test_dashboard_and_design_metrics_are_all_on_the_live_endpoint(stack: Stack) -> None:
    live = scraped_series_names(stack.scrape())
    assert live >= DESIGN_SERIES, DESIGN_SERIES - live
    for expr in expressions():
        assert promql_metric_names(expr) <= live, expr


def test_kubernetes_relabelling_keeps_only_the_metrics_port_and_labels_pod_and_namespace(
    stack: Stack,
) -> None:
    targets = wait_for("the discovered pod to be scraped", lambda: [
        t for t in stack.api("/api/v1/targets")["activeTargets"]
        if t["labels"]["job"] == K8S_JOB and t["health"] == "up"
    ])
    assert len(targets) == 1
    all_k8s = [t for t in stack.api("/api/v1/targets")["activeTargets"]
               if t["labels"]["job"] == K8S_JOB]
    assert len(all_k8s) == 1, "the gRPC port and the unrelated pod must be dropped"
    series = wait_for("a series from the relabelled job", lambda: stack.query(
        f'gptoss_num_requests_running{{job="{K8S_JOB}"}}'))
    labels = series[0]["metric"]
    assert (labels["namespace"], labels["pod"], labels["node"]) == (
        "gptoss", "gptoss-serve-7d9f-abcde", "gpu-node-1")


def test_sigterm_drains_and_exits_cleanly(stack: Stack) -> None:
    """Kubernetes sends SIGTERM after preStop: the server must exit 0 on its own within the grace."""
    assert stack.server.poll() is None
    assert health(stack.grpc_port) == "SERVING"
    stack.server.send_signal(signal.SIGTERM)
    assert stack.server.wait(60) == 0
