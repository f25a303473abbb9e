"""`gptoss-serve bench` against a real loopback server: figures that add up, files written."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.lengths import LengthDist, clip_lengths, make_workload
from bench.report import RequestRecord, percentile, summarize, tokens_before
from bench.sweep import BenchOptions, resolve_levels, run_bench

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(prompt_dist=LengthDist.parse("lognormal:12:0.8"),
             output_dist=LengthDist.parse("lognormal:6:0.6"))
LATENCIES = ("ttft", "itl", "tpot", "e2e")


def check_result(r: dict, n: int, expected_tokens: int) -> None:
    t = r["throughput"]
    assert t["requests"] == n == t["completed"] + t["failed"]
    assert t["failed"] == 0 and r["errors"] == {}
    assert r["finish_reasons"] == {"LENGTH": n}
    assert t["output_tokens"] == expected_tokens  # ignore_eos: every length is exact
    assert t["output_tok_s"] > 0 and t["requests_s"] > 0 and t["wall_s"] > 0
    assert r["ttft"]["count"] == r["e2e"]["count"] == n
    assert r["itl"]["count"] > 0
    for key in LATENCIES:
        s = r[key]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
    assert r["ttft"]["p50"] <= r["e2e"]["p50"]


def test_bench_cli_reports_a_sweep_and_writes_json_plot_and_records(server, tmp_path) -> None:  # noqa: ANN001
    out_json, plot, record = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "load.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "--server", server.target,
         "--concurrency", "1,4", "--requests", "6,20", "--prompt-len-dist", "lognormal:12:0.8",
         "--output-len-dist", "lognormal:6:0.6", "--seed", "7", "--json", str(out_json),
         "--plot", str(plot), "--record", str(record), "--device-name", "test-cpu",
         "--commit", "abc1234", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "out tok/s" in proc.stdout
    out = json.loads(out_json.read_text())
    assert {"ttft", "itl", "e2e", "throughput", "errors", "config", "results"} <= set(out)
    assert [r["concurrency"] for r in out["results"]] == [1, 4]
    assert out["model"]["max_context"] == 256 and out["model"]["vocab_size"] == 259
    for r, n in zip(out["results"], (6, 20), strict=True):
        specs = make_workload(n, SMALL["prompt_dist"], SMALL["output_dist"], vocab_size=259,
                              max_context=256, max_new_limit=256, seed=7)
        check_result(r, n, sum(s.max_new_tokens for s in specs))
    assert out["throughput"] == out["results"][-1]["throughput"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row, r in zip(rows, out["results"], strict=True):
        assert row["bench"] == "load" and row["device"] == "test-cpu"
        assert row["commit"] == "abc1234" and row["date"]
        assert row["out_tok_s"] == r["throughput"]["output_tok_s"] > 0
        assert row["ttft_p50"] <= row["ttft_p99"] and row["itl_p50"] > 0


def test_bench_poisson_arrivals_complete_every_request(server) -> None:  # noqa: ANN001
    opts = BenchOptions(target=server.target, concurrency=(4,), requests=(20,), rate=200.0,
                        progress=False, temperature=0.0, **SMALL)
    out = asyncio.run(run_bench(opts))
    specs = make_workload(20, SMALL["prompt_dist"], SMALL["output_dist"], vocab_size=259,
                          max_context=256, max_new_limit=256, seed=0)
    check_result(out["results"][0], 20, sum(s.max_new_tokens for s in specs))
    assert out["results"][0]["rate"] == 200.0


def test_bench_counts_refusals_by_grpc_code(make_server) -> None:  # noqa: ANN001
    server = make_server(max_queue=0)  # every request is refused with RESOURCE_EXHAUSTED
    opts = BenchOptions(target=server.target, concurrency=(3,), requests=(9,), progress=False,
                        **SMALL)
    r = asyncio.run(run_bench(opts))["results"][0]
    assert r["errors"] == {"RESOURCE_EXHAUSTED": 9}
    assert r["throughput"]["failed"] == 9 and r["throughput"]["completed"] == 0
    assert r["ttft"]["count"] == 0 and r["ttft"]["p50"] is None


def test_bench_reports_an_unreachable_server_as_an_error(tmp_path) -> None:  # noqa: ANN001
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "--server", f"127.0.0.1:{port}",
         "--wait", "1", "--requests", "1", "--no-progress"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


def test_workload_is_seeded_long_tailed_and_fits_the_server() -> None:
    prompt, output = LengthDist.parse("sharegpt", "prompt"), LengthDist.parse("sharegpt", "output")
    kw = dict(vocab_size=201088, max_context=8192, max_new_limit=4096, seed=3)
    specs = make_workload(2000, prompt, output, **kw)
    assert specs == make_workload(2000, prompt, output, **kw)
    assert specs != make_workload(2000, prompt, output, **{**kw, "seed": 4})
    p = [len(s.prompt_ids) for s in specs]
    o = [s.max_new_tokens for s in specs]
    assert 150 <= percentile(p, 50) <= 260 and 150 <= percentile(o, 50) <= 260
    assert percentile(p, 99) > 5 * percentile(p, 50)  # a long tail, like ShareGPT
    assert all(a + b <= 8192 and b <= 4096 for a, b in zip(p, o, strict=True))
    assert all(0 <= t < 201088 for s in specs[:50] for t in s.prompt_ids)
    tight = make_workload(500, prompt, output, vocab_size=259, max_context=64, seed=0)
    assert all(len(s.prompt_ids) + s.max_new_tokens <= 64 and s.max_new_tokens >= 1
               and s.prompt_ids for s in tight)


def test_clipping_keeps_both_lengths_positive_and_within_the_context() -> None:
    assert clip_lengths(5000, 5000, 2048, 2048) == (1024, 1024)
    assert clip_lengths(10, 20, 2048, 8) == (10, 8)
    assert clip_lengths(3000, 10, 2048, 2048) == (2038, 10)
    assert clip_lengths(1, 1, 2, 1) == (1, 1)


@pytest.mark.parametrize("spec", ["", "lognormal:200", "uniform:9:3", "fixed:0", "gamma:1:2",
                                  "lognormal:a:b", "sharegpt:1"])
def test_bad_length_distributions_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        LengthDist.parse(spec)


def test_percentile_interpolates_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_steady_throughput_counts_only_tokens_before_the_drain() -> None:
    """A closed loop ends with a drain; the steady figure stops at the last request sent."""
    a = RequestRecord(0, 10, 5, sent_s=0.0, ttft_s=1.0, e2e_s=5.0, output_tokens=5,
                      itl_s=[1.0] * 4, finish="LENGTH")  # tokens at 1, 2, 3, 4, 5 s
    b = RequestRecord(1, 10, 3, sent_s=2.5, ttft_s=0.5, e2e_s=1.5, output_tokens=3,
                      itl_s=[0.5, 0.5], finish="LENGTH")  # tokens at 3, 3.5, 4 s
    assert [tokens_before(a, t) for t in (0.5, 1.0, 2.5, 9.0)] == [0, 1, 2, 5]
    assert tokens_before(b, 2.5) == 0 and tokens_before(b, 3.6) == 2
    assert summarize([a, b], wall_s=5.0, concurrency=2)["throughput"][
        "steady_output_tok_s"] is None  # every request had its own client: no such window
    t = summarize([a, b], wall_s=5.0, concurrency=1)["throughput"]
    assert t["output_tok_s"] == pytest.approx(8 / 5.0)
    assert t["steady_output_tok_s"] == pytest.approx(2 / 2.5)  # a's tokens at 1 s and 2 s
    assert summarize([a, b], wall_s=5.0, concurrency=1, rate=2.0)["throughput"][
        "steady_output_tok_s"] is None  # Poisson arrivals: no closed-loop window


def test_max_concurrency_means_the_server_slots_and_levels_run_once() -> None:
    opts = BenchOptions(target="x", concurrency=(1, 8, "max", 8), requests=(5, 10, 20, 30))
    assert resolve_levels(opts, 48) == [(1, 5), (8, 10), (48, 20)]
    with pytest.raises(ValueError):
        BenchOptions(target="x", concurrency=(1, 8), requests=(1, 2, 3))


def test_serve_random_shape_serves_a_preset_with_random_weights(serve_process) -> None:  # noqa: ANN001
    from service.client import GenerationClient

    proc = serve_process("--random-shape", "tiny", "--max-slots", "2")
    with GenerationClient(proc.target, timeout=60) as c:
        info = c.model_info()
        assert info.model == "random-tiny" and info.num_layers == 4 and info.max_slots == 2
        out = c.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True, temperature=0.0)
        assert len(out.token_ids) == 4


def test_random_shape_is_a_known_preset_and_excludes_a_checkpoint() -> None:
    from service.config import ServerConfig

    with pytest.raises(ValueError, match="unknown shape"):
        ServerConfig(random_shape="7b")
    with pytest.raises(ValueError, match="not both"):
        ServerConfig(random_shape="20b", model="/ckpt")
    assert ServerConfig(random_shape="20b").random_shape == "20b"
