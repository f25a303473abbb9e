"""Shared pieces of the GPU benchmarks: peak rates measured at the start, timing, results files.

Every benchmark prints its figure beside a roofline: bytes moved ÷ the measured device copy
bandwidth, or FLOPs ÷ the measured bf16 GEMM rate (DESIGN §10). Results are appended as JSON lines
to bench/results/<name>.jsonl, and to $OUT/<name>.jsonl when $OUT is set (the GPU runner's folder).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# BENCH_DEVICE=cpu runs the benchmarks' code on the CPU (Triton interpreter, tiny shapes): a smoke
# test of the scripts themselves, never a measurement.
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Peaks:
    bandwidth: float  # bytes/s, device-to-device copy (read + write counted)
    gemm: float  # FLOP/s, bf16 8192³ matmul

    def as_dict(self) -> dict[str, float]:
        return {"copy_TBps": self.bandwidth / 1e12, "gemm_TFLOPs": self.gemm / 1e12}


def graph_call_us(fn: Callable[[int], object], calls: int, iters: int = 20) -> float:
    """µs per call of fn(i), i = 0 … calls − 1, all captured into one CUDA graph (compiled and
    warmed up on a side stream first), from `iters` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    return cuda_time(graph.replay, iters=iters, warmup=2) / calls * 1e6


def cuda_time(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Mean seconds per call of fn on the current stream (CUDA events, after a warm-up)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda" or not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def graph_time(fn: Callable[[], object], iters: int = 20, calls_per_graph: int = 10) -> float:
    """Seconds per call with `calls_per_graph` calls captured in one CUDA graph (no launch gaps):
    what the kernel costs inside the decode graph."""
    if DEVICE != "cuda":
        return cuda_time(fn, iters=1, warmup=1)
    fn()  # compile outside capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(calls_per_graph):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return cuda_time(graph.replay, iters=iters) / calls_per_graph


def measure_peaks() -> Peaks:
    if DEVICE != "cuda":
        return Peaks(bandwidth=1e10, gemm=1e11)  # placeholders for the CPU smoke run
    n = 1 << 28  # 512 MiB of bf16 per buffer
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(functools.partial(b.copy_, a), iters=20)
    bandwidth = 2 * a.numel() * a.element_size() / t
    a = b = None  # free before the GEMM buffers
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    t = cuda_time(lambda: x @ y, iters=20)
    return Peaks(bandwidth=bandwidth, gemm=2 * m**3 / t)


def commit() -> str:
    """The tree's commit: $GPTOSS_COMMIT or $COMMIT (the GPU machine gets a copy without .git),
    else git."""
    for name in ("GPTOSS_COMMIT", "COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def record(name: str, row: dict) -> dict:
    """Adds commit/date/device and appends the row to bench/results/<name>.jsonl (and $OUT)."""
    row = {**row, "device": device_name(), "commit": commit(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    line = json.dumps(row, sort_keys=True)
    targets = [RESULTS / f"{name}.jsonl"] if DEVICE == "cuda" else []  # no CPU smoke figures
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / f"{name}.jsonl")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return row


def require_cuda() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
