"""Decode attention latency candidates per layer kind vs today's SERVING config, 20b heads.

    python -m bench.attn_decode [--only a,b] [--ctx 4096] [--full-cap 32768] [--ring 383]
    BENCH_DEVICE=cpu python -m bench.attn_decode   # smoke: interpreter, tiny shapes, no records

Candidates: kernels/decode_latency.py (WINDOW for sliding layers, FULL for full ones), each on
its own layer kind only, beside SERVING. First every one is checked against
decode_attention_ref in bf16 (odd lengths, position 0, window edges on a wrapped ring, a forced
many-split row, two calls on the same counters, CUDA-graph replays with new positions, counters
left at zero); a wrong one is not timed and the run exits 1. Then, in CUDA graphs, at B = 1 and
8: a full layer at context 4096 (cache capacity --full-cap, as the serving max_context: the split
count follows it) and a window-128 layer at position 4095 (ring of --ring rows, as serving's
window + max_chunk_tokens − 1):
- cold: each call of the graph reads other slots' K/V (≥ 160 MB cycled, 3× the L2), as in the
  decode step where ~600 MB of weights pass between two attention layers;
- hot: 10 calls on the same slots (L2-warm), comparable with bench.kernels --decode-variants.
Roofline = K and V bytes read ÷ the measured copy bandwidth (and ÷ 3.35 TB/s, the H100 data
sheet). One JSON line per (candidate, shape) in bench/results/kernels.jsonl (bench "attn_decode").
"""

from __future__ import annotations

import argparse
import math

import torch

import bench.common as common
from bench.common import cuda_time, graph_time, measure_peaks, record, require_cuda
from bench.kernels_decode import check_graph
from kernels.decode_attention import _num_sms, decode_attention, decode_attention_ref
from kernels.decode_latency import FULL, WINDOW
from kernels.decode_variants import SERVING, DecodeVariant, arrival_counters

NOMINAL_BW = 3.35e12  # H100 SXM data sheet, bytes/s
COLD_BYTES = 160e6  # K/V cycled per cold graph (H100 / H200 L2: 50 MB)
GPU = dict(nq=64, nkv=8, d=64, dtype=torch.bfloat16, window=128, ctx=4096, batches=(1, 8))
CPU = dict(nq=8, nkv=2, d=16, dtype=torch.float32, window=8, ctx=40, batches=(1, 2))


def kinds(only: list[str]) -> dict[str, dict[str, DecodeVariant]]:
    """{"window": {name: cfg}, "full": {...}}, SERVING first in each."""
    out = {}
    for kind, cands in (("window", WINDOW), ("full", FULL)):
        pick = {"serving": SERVING, **cands}
        out[kind] = {n: c for n, c in pick.items() if not only or n in only or n == "serving"}
    return out


def check_cases(dims: dict, window: int) -> list[tuple[int, list[int], int | None]]:
    """(capacity, positions, forced splits) of the correctness check of one layer kind."""
    if window:
        cap = window + 63 if common.DEVICE == "cuda" else window + 5
        return [(cap, [5, window - 1, window, 1000, 4095], None)]
    if common.DEVICE == "cuda":
        return [(1200, [0, 1199, 37, 700, 64], None), (1200, [999], 16),
                (4352, [4095], None)]
    return [(120, [0, 119, 37], None), (120, [99], 4)]


def check(cfg: DecodeVariant, dims: dict, window: int) -> str | None:
    """None if cfg gives decode_attention_ref's answer (twice, and from graph replays)."""
    dev = torch.device(common.DEVICE)
    g = torch.Generator(device=dev).manual_seed(7)
    nq, nkv, d, dt = dims["nq"], dims["nkv"], dims["d"], dims["dtype"]
    sinks = torch.randn(nq, device=dev, generator=g)
    problems = []
    for cap, positions, splits in check_cases(dims, window):
        kc = torch.randn(6, cap, nkv, d, device=dev, generator=g).to(dt)
        vc = torch.randn(6, cap, nkv, d, device=dev, generator=g).to(dt)
        b = len(positions)
        q = torch.randn(b, nq, d, device=dev, generator=g).to(dt)
        slots = torch.tensor([5, 0, 3, 1, 2][:b], device=dev)
        args = (q, kc, vc, slots, torch.tensor(positions, device=dev), sinks, window, d**-0.5)
        want = decode_attention_ref(*args)
        for label in ("first call", "second call"):
            got = decode_attention(*args, num_splits=splits, config=cfg)
            err = (got.float() - want.float()).abs().max().item()
            if not err <= 2e-2 + 2e-2 * want.float().abs().max().item():
                problems.append(f"W={window} positions={positions} {label}: max err {err:.3g}")
        if common.DEVICE == "cuda":
            problems += check_graph({"config": cfg}, args, splits, cap)
    if common.DEVICE == "cuda":
        torch.cuda.synchronize()
    if int(arrival_counters(1, dev).abs().sum()):
        problems.append("arrival counters not left at zero")
    return "; ".join(problems) or None


def launch_shape(cfg: DecodeVariant, batch: int, nkv: int, keys: int, max_keys: int,
                 dev: torch.device) -> tuple[int, int, int]:
    """(splits, programs launched, programs with keys) as decode_attention launches them."""
    splits = min(cfg.splits(batch, nkv, max_keys, _num_sms(dev)), cfg.max_splits)
    blocks = math.ceil(keys / cfg.block_n)
    active = math.ceil(blocks / math.ceil(blocks / splits))
    return splits, batch * nkv * splits, batch * nkv * active


def cold_time(fn, groups: int) -> float:  # noqa: ANN001 - fn(i) runs call i
    """Seconds per call of fn(i), i = 0 … groups − 1 in one CUDA graph (each on other K/V)."""
    if common.DEVICE != "cuda":
        return cuda_time(lambda: [fn(i) for i in range(groups)], iters=1, warmup=1) / groups
    fn(0)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(groups):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    return cuda_time(graph.replay, iters=10, warmup=2) / groups


def time_kind(kind: str, cands: dict, dims: dict, batch: int, cap: int, bw: float) -> list[dict]:
    dev = torch.device(common.DEVICE)
    nq, nkv, d, dt, ctx = dims["nq"], dims["nkv"], dims["d"], dims["dtype"], dims["ctx"]
    window = dims["window"] if kind == "window" else 0
    keys = min(ctx, window) if window else ctx
    kv_bytes = batch * keys * nkv * d * dt.itemsize * 2
    groups = max(2, min(512, math.ceil(COLD_BYTES / kv_bytes))) if common.DEVICE == "cuda" else 2
    kc = torch.randn(groups * batch + 1, cap, nkv, d, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, nq, d, device=dev, dtype=dt)
    sinks = torch.randn(nq, device=dev)
    pos = torch.full((batch,), ctx - 1, device=dev)
    slot_groups = [torch.arange(i * batch, (i + 1) * batch, device=dev) for i in range(groups)]
    rows = []
    for name, cfg in cands.items():
        def call(i: int, cfg: DecodeVariant = cfg) -> torch.Tensor:
            return decode_attention(q, kc, vc, slot_groups[i], pos, sinks, window, d**-0.5,
                                    config=cfg)
        cold = cold_time(call, groups)
        hot = graph_time(lambda call=call: call(0))
        splits, launched, working = launch_shape(cfg, batch, nkv, keys, min(cap, window or cap),
                                                 dev)
        rows.append(record("kernels", {
            "bench": "attn_decode", "kernel": "decode_attn_latency", "variant": name,
            "kind": kind, "batch": batch, "context": ctx, "window": window, "capacity": cap,
            "splits": splits, "programs": launched, "programs_with_keys": working,
            "us": cold * 1e6, "us_hot": hot * 1e6, "bytes": kv_bytes,
            "roofline_us": kv_bytes / bw * 1e6, "roofline_nominal_us": kv_bytes / NOMINAL_BW * 1e6,
        }))
        print(f"{kind:<6} B={batch} {name:<20} cold {cold * 1e6:7.2f} µs  hot {hot * 1e6:7.2f} µs",
              flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'kind':<7}{'B':>2} {'candidate':<21}{'splits':>6}{'progs':>7}{'work':>6}"
          f"{'cold µs':>10}{'hot µs':>10}{'roof µs':>9}{'×roof':>8}{'vs serving':>11}")
    base = {(r["kind"], r["batch"]): r["us"] for r in rows if r["variant"] == "serving"}
    for r in rows:
        print(f"{r['kind']:<7}{r['batch']:>2} {r['variant']:<21}{r['splits']:>6}"
              f"{r['programs']:>7}{r['programs_with_keys']:>6}{r['us']:10.2f}{r['us_hot']:10.2f}"
              f"{r['roofline_us']:9.2f}{r['us'] / r['roofline_us']:8.1f}"
              f"{r['us'] - base[(r['kind'], r['batch'])]:+11.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    """The records of the timed cases; SystemExit naming any candidate that was wrong."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="candidate names, a,b (SERVING always runs)")
    ap.add_argument("--full-cap", type=int, default=32768, help="full layers' cache capacity")
    ap.add_argument("--ctx", type=int, default=4096, help="full layers' context (GPU)")
    ap.add_argument("--ring", type=int, default=128 + 256 - 1, help="sliding layers' ring rows")
    args = ap.parse_args(argv)
    require_cuda()
    dims = {**GPU, "ctx": args.ctx} if common.DEVICE == "cuda" else CPU
    only = [n for n in args.only.split(",") if n]
    todo = kinds(only)
    bw = measure_peaks().bandwidth
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, SMs {_num_sms(torch.device(common.DEVICE))}", flush=True)
    wrong = {}
    for kind, cands in todo.items():
        window = dims["window"] if kind == "window" else 0
        for name, cfg in list(cands.items()):
            problem = check(cfg, dims, window)
            print(f"check {kind:<6} {name:<20} {'ok' if problem is None else 'WRONG: ' + problem}",
                  flush=True)
            if problem is not None:
                wrong[f"{kind}/{name}"] = problem
                del cands[name]
    full_cap = args.full_cap if common.DEVICE == "cuda" else dims["ctx"]
    ring = args.ring if common.DEVICE == "cuda" else dims["window"] + 5
    rows = []
    for batch in dims["batches"]:
        for kind, cands in todo.items():
            if cands:
                rows += time_kind(kind, cands, dims, batch, ring if kind == "window" else full_cap,
                                  bw)
    print_table(rows)
    for name, problem in wrong.items():
        print(f"!!! {name} is WRONG (not timed): {problem}")
    if wrong:
        raise SystemExit(f"attn_decode: wrong candidates (not timed): {', '.join(wrong)}")
    return rows


if __name__ == "__main__":
    main()
