"""The decode-size dense projections (kernels/dense_gemv.py) against cuBLAS and the copy roofline.

    python -m bench.dense_gemv [--rows 1,2,4,8] [--copies 8] [--calls 128]

gpt-oss's attention projections (20b and 120b alike: hidden 2880, 64 query heads × 64):
qkv y = x·Wᵀ + b with W [5120, 2880] bf16 (29.5 MB) and out W [2880, 4096] (23.6 MB), at M rows.
First every tile candidate is checked against F.linear (fresh random inputs, the output memory
poisoned with NaN beforehand); the run exits non-zero naming any that disagrees, untimed. Then
cuBLAS's F.linear and every candidate are timed in CUDA graphs of `--calls` calls that rotate over
`--copies` distinct weight copies (≥ 6 × 24 MB ≫ the H100's 50 MB L2: every call streams W from
HBM). roofline_us = bytes (W + b + x + y) ÷ the measured copy bandwidth. One JSON line per
(shape, M) goes to bench/results/kernels.jsonl with bench "dense_gemv".
BENCH_DEVICE=cpu runs the same code at a toy shape, interpreted, one eager call each, and records
nothing (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bench.common as common
from kernels.dense_gemv import CANDIDATES, GemvDenseTiles, linear_small

GPU_SHAPES = {"qkv": (5120, 2880), "out": (2880, 4096)}  # name → (N, K)
SMOKE_SHAPES = {"smoke": (37, 200)}
REL_TOL = 1e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def disagreeing(n: int, k: int, rows: list[int], dev: str, dtype: torch.dtype) -> list[str]:
    """Names of the candidates whose output differs from F.linear at some M (or holds NaN)."""
    bad = []
    for name, tiles in CANDIDATES.items():
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
            b = torch.randn(n, device=dev, dtype=dtype)
            poison = torch.full((m, n), float("nan"), device=dev, dtype=dtype)
            del poison  # the caching allocator hands this block to the kernel's output
            got = linear_small(x, w, b, tiles)
            err = rel_err(got, F.linear(x, w, b))
            if not err < REL_TOL:  # NaN fails too
                print(f"MISMATCH {name} M={m} N={n} K={k}: rel err {err:.3g}")
                bad.append(name)
                break
    return bad


def per_call_us(fn: Callable[[int], object], calls: int) -> float:
    """µs per call of fn(i), i = 0…calls-1, all captured in one CUDA graph (eager on the CPU)."""
    if common.DEVICE != "cuda":
        t0 = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t0) * 1e6
    return common.graph_call_us(fn, calls, iters=10)


def time_shape(
    n: int, k: int, m: int, copies: int, calls: int, dev: str, dtype: torch.dtype
) -> dict[str, float]:
    ws = [(torch.randn(n, k, device=dev) / k**0.5).to(dtype) for _ in range(copies)]  # [N, K]
    bs = [torch.randn(n, device=dev, dtype=dtype) for _ in range(copies)]  # [N]
    x = torch.randn(m, k, device=dev, dtype=dtype)  # [M, K]
    out = {"cublas": per_call_us(lambda i: F.linear(x, ws[i % copies], bs[i % copies]), calls)}
    for name, tiles in CANDIDATES.items():
        out[name] = per_call_us(_call(x, ws, bs, tiles), calls)
    return out


def _call(
    x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor], tiles: GemvDenseTiles
) -> Callable[[int], object]:
    return lambda i: linear_small(x, ws[i % len(ws)], bs[i % len(bs)], tiles)


@dataclass(frozen=True)
class GemvBenchSetup:
    """What the small-M GEMV benches (this one, bench/norm_gemv.py) run with: bf16 on the GPU,
    fp32 smoke shapes on the CPU (BENCH_DEVICE=cpu)."""

    gpu: bool
    dev: str
    dtype: torch.dtype
    rows: list[int]
    copies: int  # distinct weight copies rotated per call (past L2)
    calls: int  # calls per graph replay


def setup(argv: list[str] | None, description: str) -> GemvBenchSetup:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rows", default="1,2,4,8", help="batch rows M to run (≤ 8)")
    ap.add_argument("--copies", type=int, default=8, help="distinct weight copies per shape (≥ 6)")
    ap.add_argument("--calls", type=int, default=128, help="calls per graph replay (≥ 100)")
    args = ap.parse_args(argv)
    common.require_cuda()
    gpu = common.DEVICE == "cuda"
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    copies, calls = (max(6, args.copies), max(100, args.calls)) if gpu else (2, 1)
    return GemvBenchSetup(gpu, dev, dtype, [int(r) for r in args.rows.split(",")], copies, calls)


def main(argv: list[str] | None = None) -> list[dict]:
    st = setup(argv, __doc__.splitlines()[0])
    gpu, dev, dtype, rows, copies, calls = st.gpu, st.dev, st.dtype, st.rows, st.copies, st.calls
    shapes = GPU_SHAPES if gpu else SMOKE_SHAPES
    torch.manual_seed(0)
    bad = sorted({name for n, k in shapes.values() for name in disagreeing(n, k, rows, dev, dtype)})
    if bad:
        raise SystemExit(f"bench.dense_gemv: candidates disagree with F.linear: {', '.join(bad)}")
    peaks = common.measure_peaks()
    results = []
    for shape, (n, k) in shapes.items():
        for m in rows:
            us = time_shape(n, k, m, copies, calls, dev, dtype)
            size = torch.tensor([], dtype=dtype).element_size()
            nbytes = size * (n * k + n + m * k + m * n)
            row = {"bench": "dense_gemv", "shape": shape, "n": n, "k": k, "m": m,
                   "cublas_us": us.pop("cublas"), "candidates_us": us,
                   "roofline_us": nbytes / peaks.bandwidth * 1e6, **peaks.as_dict(),
                   "copies": copies, "calls_per_graph": calls}
            results.append(common.record("kernels", row) if gpu else row)
    print_table(results)
    return results


def print_table(results: list[dict]) -> None:
    names = list(CANDIDATES)
    head = f"{'shape':<6}{'M':>3}{'roofline':>10}{'cublas':>9}" + "".join(
        f"{name:>21}" for name in names)
    print("== dense GEMV, µs per call (graph, weights rotated past L2) ==")
    print(head)
    for r in results:
        cells = "".join(f"{r['candidates_us'][name]:>21.2f}" for name in names)
        print(f"{r['shape']:<6}{r['m']:>3}{r['roofline_us']:>10.2f}{r['cublas_us']:>9.2f}{cells}")


if __name__ == "__main__":
    main()
