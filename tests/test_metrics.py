"""/metrics after real traffic: every DESIGN §8 metric, with values that agree with the replies."""

from __future__ import annotations

import grpc
import pytest

from service.client import GenerationClient
from tests.conftest import scrape, wait_for

HISTOGRAMS = (
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
    "step_duration_seconds", "batch_size", "scheduler_host_seconds",
)
COUNTERS = (
    "prompt_tokens_total", "generation_tokens_total", "requests_total", "request_errors_total",
    "cuda_graph_replays_total", "prefix_cache_hit_tokens_total",
)
GAUGES = ("num_requests_running", "num_requests_waiting", "slots_used", "kv_cache_usage_ratio")


def families(port: int) -> set[str]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}


def test_every_metric_is_exported_with_the_gptoss_prefix(server) -> None:  # noqa: ANN001
    names = families(server.metrics_port)
    for name in HISTOGRAMS + GAUGES + COUNTERS:
        assert f"gptoss_{name}" in names, name
    samples = scrape(server.metrics_port)
    assert samples['gptoss_requests_total{finish_reason="stop_sequence"}'] == 0
    assert samples['gptoss_request_errors_total{code="RESOURCE_EXHAUSTED"}'] == 0
    assert not any(key.endswith("_created") for key in samples)


def test_metrics_agree_with_the_traffic(server) -> None:  # noqa: ANN001
    replies = []
    with GenerationClient(server.target, timeout=60) as c:
        prompt = list(range(10, 40))
        replies.append(c.generate(prompt, max_new_tokens=6, temperature=0.0, ignore_eos=True))
        # Continues the first conversation: the slot's cached prefix is reused.
        follow = prompt + list(replies[0].token_ids[:4]) + [3]
        replies.append(c.generate(follow, max_new_tokens=5, temperature=0.0, ignore_eos=True))
        for i in range(4):
            msgs = list(c.stream([i + 1, i + 2], max_new_tokens=3 + i, ignore_eos=True))
            replies.append(msgs[-1])
        with pytest.raises(grpc.RpcError):
            c.generate([1], max_new_tokens=0)
    wait_for(lambda: scrape(server.metrics_port)["gptoss_slots_used"] == 0)
    m = scrape(server.metrics_port)
    n = len(replies)
    assert m["gptoss_time_to_first_token_seconds_count"] == n
    assert m["gptoss_e2e_request_latency_seconds_count"] == n
    assert m["gptoss_request_queue_time_seconds_count"] == n
    assert m['gptoss_requests_total{finish_reason="length"}'] == n
    completion = sum(r.usage.completion_tokens for r in replies)
    prompt_tokens = sum(r.usage.prompt_tokens for r in replies)
    assert m["gptoss_generation_tokens_total"] == completion
    assert m["gptoss_request_generation_tokens_sum"] == completion
    assert m["gptoss_prompt_tokens_total"] == prompt_tokens
    assert m["gptoss_request_prompt_tokens_sum"] == prompt_tokens
    # One inter-token gap per token after each request's first.
    assert m["gptoss_inter_token_latency_seconds_count"] == completion - n
    cached = sum(r.usage.cached_prompt_tokens for r in replies)
    assert cached == len(prompt) + 4  # everything the slot held that the follow-up shares
    assert m["gptoss_prefix_cache_hit_tokens_total"] == cached
    steps = (m['gptoss_step_duration_seconds_count{kind="prefill"}']
             + m['gptoss_step_duration_seconds_count{kind="decode"}'])
    assert steps == m["gptoss_batch_size_count"] > 0
    assert m["gptoss_scheduler_host_seconds_count"] == steps  # one host-time sample per step
    assert m["gptoss_scheduler_host_seconds_sum"] > 0
    assert m["gptoss_cuda_graph_replays_total"] == 0  # CPU: no graphs
    assert m['gptoss_request_errors_total{code="INVALID_ARGUMENT"}'] == 1
    assert m["gptoss_num_requests_running"] == m["gptoss_num_requests_waiting"] == 0
    assert m["gptoss_kv_cache_usage_ratio"] == 0


def test_kv_cache_usage_and_slots_while_running(make_server, slow_engine) -> None:  # noqa: ANN001
    server = make_server(engine=slow_engine(0.01))
    with GenerationClient(server.target, timeout=60) as c:
        stream = c.stream([1] * 50, max_new_tokens=150, temperature=0.0, ignore_eos=True)
        next(stream)
        wait_for(lambda: scrape(server.metrics_port)["gptoss_kv_cache_usage_ratio"] > 0)
        m = scrape(server.metrics_port)
        assert m["gptoss_slots_used"] == 1 and m["gptoss_num_requests_running"] == 1
        assert 50 / (8 * 256) <= m["gptoss_kv_cache_usage_ratio"] <= 200 / (8 * 256)
        stream.cancel()
