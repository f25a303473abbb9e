"""Decode attention candidates side by side (`python -m bench.kernels --decode-variants`).

For each candidate of kernels.decode_variants.CANDIDATES (keyword arguments of
decode_attention; "default" is today's two-launch path): first a correctness check against
decode_attention_ref on the GPU at small real shapes (20b heads, bf16; rows of very different
lengths incl. position 0, a sliding layer on a wrapped ring, a forced many-split row called twice,
and CUDA-graph replays with new lengths, which also proves the fused merge's counters reset);
a wrong candidate is reported loudly, not timed, and the run exits 1. Then graph_time at B=1
full layer 1k/4k/32k, B=1 window 128 and B=8/32/64 at 4k, and ONE table last: rows = shapes,
columns = candidates, µs and × roofline (bytes = the K and V rows read ÷ copy bandwidth).
One jsonl record per (candidate, shape) in bench/results/kernels.jsonl (kernel
"decode_attn_variant", field "variant").
"""

from __future__ import annotations

import math

import torch

from bench.common import DEVICE, Peaks, graph_time, record
from kernels.decode_attention import _num_sms, decode_attention, decode_attention_ref, decode_splits
from kernels.decode_variants import CANDIDATES, arrival_counters

# (batch, context, window); context = position + 1 of every row
SHAPES = [(1, 1024, 0), (1, 4096, 0), (1, 32768, 0), (1, 4096, 128), (8, 4096, 0),
          (32, 4096, 0), (64, 4096, 0)]
SMOKE_SHAPES = [(1, 40, 0), (2, 100, 0), (1, 100, 8)]  # BENCH_DEVICE=cpu (interpreter)
# correctness checks: (window, cache capacity, positions, forced splits)
CHECKS = [
    (0, 1200, [0, 1199, 37, 700, 64], None),  # very different lengths in one batch
    (0, 1200, [999], 16),  # one row, many splits
    (128, 128 + 63, [5, 127, 128, 1000], None),  # window edges, a wrapped ring
]
SMOKE_CHECKS = [(0, 120, [0, 119, 37], None), (0, 120, [99], 4), (8, 15, [5, 7, 8, 100], None)]


def splits_of(kw: dict, batch: int, nkv: int, keys: int, device: torch.device) -> int:
    cfg = kw.get("config")
    if cfg is not None:
        return cfg.splits(batch, nkv, keys, _num_sms(device))
    return decode_splits(batch, nkv, keys, int(kw.get("block_n", 64)), device)


def check(name: str, kw: dict, nq: int, nkv: int, d: int, dtype: torch.dtype) -> str | None:
    """None if the candidate matches decode_attention_ref, else what went wrong."""
    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(7)
    sinks = torch.randn(nq, device=dev, generator=g)
    problems = []
    for window, cap, positions, splits in CHECKS if DEVICE == "cuda" else SMOKE_CHECKS:
        kc = torch.randn(6, cap, nkv, d, device=dev, generator=g).to(dtype)
        vc = torch.randn(6, cap, nkv, d, device=dev, generator=g).to(dtype)
        b = len(positions)
        q = torch.randn(b, nq, d, device=dev, generator=g).to(dtype)
        slots = torch.tensor([5, 0, 3, 1, 2][:b], device=dev)
        pos = torch.tensor(positions, device=dev)
        args = (q, kc, vc, slots, pos, sinks, window, d**-0.5)
        first = decode_attention(*args, num_splits=splits, **kw)
        again = decode_attention(*args, num_splits=splits, **kw)  # same counters, reset?
        want = decode_attention_ref(*args)
        for label, got in (("first call", first), ("second call", again)):
            err = (got.float() - want.float()).abs().max().item()
            if not err <= 2e-2 + 2e-2 * want.float().abs().max().item():
                problems.append(f"W={window} positions={positions} {label}: max err {err:.3g}")
        if DEVICE == "cuda":
            problems += check_graph(kw, args, splits, cap)
    if DEVICE == "cuda" and kw.get("config") is not None:
        torch.cuda.synchronize()
        if int(arrival_counters(1, torch.device(DEVICE)).abs().sum()):
            problems.append("arrival counters not left at zero")
    return "; ".join(problems) or None


def check_graph(kw: dict, args: tuple, splits: int | None, cap: int) -> list[str]:
    """Captured once, replayed with new positions: equal to the reference each time."""
    q, kc, vc, slots, pos, sinks, window, scale = args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = decode_attention(*args, num_splits=splits, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    problems = []
    top = cap if window == 0 else 40 * cap
    for seed in range(3):
        g = torch.Generator(device=q.device).manual_seed(seed)
        pos.copy_(torch.randint(0, top, pos.shape, device=q.device, generator=g))
        graph.replay()
        want = decode_attention_ref(q, kc, vc, slots, pos, sinks, window, scale)
        err = (out.float() - want.float()).abs().max().item()
        if not err <= 2e-2 + 2e-2 * want.float().abs().max().item():
            problems.append(f"W={window} graph replay {seed}: max err {err:.3g}")
    return problems


def bench_decode_variants(peaks: Peaks, nq: int, nkv: int, d: int, dtype: torch.dtype,
                          names: list[str] | None = None) -> bool:
    """Checks, times and tabulates the candidates; False if any candidate was wrong."""
    names = names or list(CANDIDATES)
    shapes = SHAPES if DEVICE == "cuda" else SMOKE_SHAPES
    wrong = {}
    for name in names:
        problem = check(name, CANDIDATES[name], nq, nkv, d, dtype)
        print(f"check {name:<16} {'ok' if problem is None else 'WRONG: ' + problem}", flush=True)
        if problem is not None:
            wrong[name] = problem
    dev = torch.device(DEVICE)
    sinks = torch.randn(nq, device=dev)
    table: dict[tuple[int, int, int], dict[str, tuple[float, float]]] = {}
    for window in sorted({w for _, _, w in shapes}):
        mine = [s for s in shapes if s[2] == window]
        if not mine:
            continue
        cap = max(c for _, c, _ in mine) if window == 0 else window + 511
        slots = max(b for b, _, _ in mine)
        kc = torch.randn(slots + 1, cap, nkv, d, device=dev).to(dtype)
        vc = torch.randn_like(kc)
        for batch, ctx, _ in mine:
            q = torch.randn(batch, nq, d, device=dev).to(dtype)
            slot_ids = torch.arange(batch, device=dev)
            pos = torch.full((batch,), ctx - 1, device=dev)
            keys = min(ctx, window) if window else ctx
            roof = batch * keys * nkv * d * 2 * 2 / peaks.bandwidth
            row = table.setdefault((batch, ctx, window), {})
            for name in names:
                if name in wrong:
                    continue
                kw = CANDIDATES[name]
                t = graph_time(lambda q=q, s=slot_ids, p=pos, kc=kc, vc=vc, w=window, kw=kw:
                               decode_attention(q, kc, vc, s, p, sinks, w, d**-0.5, **kw))
                row[name] = (t, roof)
                splits = splits_of(kw, batch, nkv, min(cap, window) if window else cap, dev)
                print(f"decode {name:<16} B={batch:<3} ctx={ctx:<6} W={window:<4} "
                      f"splits={splits:<4} {t * 1e6:8.2f} us  {t / roof:5.2f}x roofline",
                      flush=True)
                record("kernels", {"kernel": "decode_attn_variant", "variant": name,
                                   "batch": batch, "context": ctx, "window": window,
                                   "capacity": cap, "splits": splits, "us": t * 1e6,
                                   "roofline_us": roof * 1e6})
        del kc, vc
    rows = {s: table[s] for s in shapes if s in table}  # in SHAPES order
    print_table(rows, [n for n in names if n not in wrong])
    for name, problem in wrong.items():
        print(f"!!! {name} is WRONG (not timed): {problem}")
    return not wrong


def print_table(table: dict, names: list[str]) -> None:
    width = max(15, *(len(n) + 2 for n in names))
    print("\ndecode attention, µs (× roofline); splits from shapes as in serving")
    print(f"{'B ctx W':<16}{'roof µs':>9} " + "".join(f"{n:>{width}}" for n in names))
    for (batch, ctx, window), row in table.items():
        roof = next(iter(row.values()))[1] if row else math.nan
        cells = "".join(
            f"{f'{row[n][0] * 1e6:.1f} ({row[n][0] / row[n][1]:.2f})':>{width}}" if n in row
            else f"{'-':>{width}}" for n in names)
        print(f"{f'{batch} {ctx} {window}':<16}{roof * 1e6:9.2f} {cells}")
