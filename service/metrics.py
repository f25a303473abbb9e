"""Prometheus metrics (DESIGN §8): the only module that imports prometheus_client.

Every metric is prefixed `gptoss_`, carries its unit in the name and has explicit buckets. Each
`Metrics` owns its registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest

from scheduler.stats import GaugeStats, RequestStats, StepStats

disable_created_metrics()  # `*_created` series double the output and nothing here reads them

PREFIX = "gptoss_"
FINISH_REASONS = ("length", "stop", "stop_sequence", "aborted", "error")
ERROR_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL",
               "UNAUTHENTICATED", "ALREADY_EXISTS", "CANCELLED", "DEADLINE_EXCEEDED")
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
)
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per scrape would drown the server log


class Metrics:
    """Implements scheduler.stats.StatsSink, plus the service's error counter."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()

        def hist(name: str, doc: str, buckets: tuple, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.itl = hist(
            "inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
            LATENCY_BUCKETS,
        )
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = hist(
            "request_queue_time_seconds", "Arrival to admission into a slot.", LATENCY_BUCKETS
        )
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.gen_len = hist(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.step = hist(
            "step_duration_seconds",
            "Engine step time, launch to tokens read (overlapped: includes the wait for the step "
            "before it on the GPU).", STEP_BUCKETS, labels=("kind",)
        )
        self.batch = hist("batch_size", "Sequences per engine step.", BATCH_BUCKETS)
        self.scheduler_time = hist(
            "scheduler_host_seconds",
            "Host time per step outside the engine (admission, planning, detokenization, stop "
            "checks); the GPU idles through it.", STEP_BUCKETS,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens_total", "Prompt tokens prefilled or reused.", registry=reg
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens_total", "Tokens generated.", registry=reg
        )
        self.requests = Counter(
            PREFIX + "requests_total", "Finished requests.", ("finish_reason",), registry=reg
        )
        self.errors = Counter(
            PREFIX + "request_errors_total",
            "Requests that ended with an error status (CANCELLED/DEADLINE_EXCEEDED: the caller "
            "went away).",
            ("code",), registry=reg,
        )
        self.graph_replays = Counter(
            PREFIX + "cuda_graph_replays_total",
            "Engine steps run as a CUDA graph replay (decode steps, and prompt-carrying steps "
            "up to the step-graph size).",
            registry=reg,
        )
        self.prefix_hits = Counter(
            PREFIX + "prefix_cache_hit_tokens_total", "Prompt tokens reused from a slot's cache.",
            registry=reg,
        )
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in a slot.", registry=reg)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued.", registry=reg)
        self.slots_used = Gauge(PREFIX + "slots_used", "KV-cache slots in use.", registry=reg)
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio", "KV-cache positions held by running requests / all.",
            registry=reg,
        )
        # Export every known series from the start, so rate() and alerts see zeros, not gaps.
        for kind in ("prefill", "decode"):
            self.step.labels(kind=kind)
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)
        for code in ERROR_CODES:
            self.errors.labels(code=code)
        self._http = None

    # ---- StatsSink (called on the engine thread; prometheus_client is thread-safe) -------------
    def on_step(self, s: StepStats) -> None:
        self.step.labels(kind=s.kind).observe(s.duration_s)
        self.batch.observe(s.batch_size)
        self.scheduler_time.observe(s.scheduler_s)
        self.prompt_tokens.inc(s.prompt_tokens + s.prefix_hit_tokens)
        self.generation_tokens.inc(s.generated_tokens)
        self.prefix_hits.inc(s.prefix_hit_tokens)
        if s.cuda_graph:
            self.graph_replays.inc()
        for value in s.ttft_s:
            self.ttft.observe(value)
        for value in s.inter_token_s:
            self.itl.observe(value)

    def on_request_done(self, s: RequestStats) -> None:
        self.requests.labels(finish_reason=s.finish_reason).inc()
        self.e2e.observe(s.e2e_s)
        if s.queue_s is not None:
            self.queue.observe(s.queue_s)
        self.prompt_len.observe(s.prompt_tokens)
        self.gen_len.observe(s.generation_tokens)

    def on_gauges(self, s: GaugeStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.slots_used.set(s.slots_used)
        self.kv_usage.set(s.kv_cache_usage_ratio)

    def on_error(self, code_name: str) -> None:
        self.errors.labels(code=code_name).inc()

    # ---- exposition -------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on `port` (0 picks a free one); returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        server = make_server(host.strip("[]"), port, make_wsgi_app(self.registry), server_cls,
                             handler_class=_QuietHandler)
        # A short poll interval keeps shutdown quick (the default waits up to 0.5 s).
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="metrics-http", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def render(self) -> str:
        return generate_latest(self.registry).decode()
