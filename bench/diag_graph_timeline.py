"""Where a graph-replayed decode step's time goes: per-kernel GPU time and the gaps between kernels.

    python -m bench.diag_graph_timeline --shape 20b --batch 1 --contexts 4096,32768

Profiles a few Engine.step calls of a decode-only plan (one CUDA graph replay each) with the torch
profiler (CUPTI records the kernels inside a graph replay), then per step: wall span from the first
kernel's start to the last kernel's end, the sum of kernel durations, and so the idle gaps between
consecutive kernels (launch latency, drain and ramp of each graph node). Kernels are grouped by
name (count per step, µs each, µs per step). A diagnostic: it prints, it records nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch

from bench.common import require_cuda, sync
from bench.decode import decode_plan, ints, make_engine
from runtime.config import preset
from runtime.synthetic import random_weights


def kernel_events(trace_path: str) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every GPU kernel in a chrome trace, by start time."""
    with open(trace_path) as f:
        trace = json.load(f)
    evs = [(e["name"], float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
           if e.get("cat") == "kernel" and "dur" in e]
    return sorted(evs, key=lambda e: e[1])


def split_steps(evs: list[tuple[str, float, float]], gap_us: float) -> list[list]:
    """Kernels grouped into steps: a new step starts after an idle gap longer than gap_us (the
    host's sampling sync between steps)."""
    steps: list[list] = []
    end = -1e18
    for e in evs:
        if e[1] - end > gap_us or not steps:
            steps.append([])
        steps[-1].append(e)
        end = max(end, e[1] + e[2])
    return steps


def short(name: str, width: int = 60) -> str:
    name = name.split("(")[0]
    return name if len(name) <= width else name[: width - 1] + "…"


def report(steps: list[list], label: str) -> None:
    steps = [s for s in steps if len(s) > 10]
    if not steps:
        print(f"{label}: no kernels recorded (CUPTI saw no graph kernels?)")
        return
    steps = steps[1:] if len(steps) > 2 else steps  # the first may be cut by the profiler start
    n = len(steps)
    span = sum(s[-1][1] + s[-1][2] - s[0][1] for s in steps) / n
    busy = sum(sum(e[2] for e in s) for s in steps) / n
    kernels = sum(len(s) for s in steps) / n
    print(f"\n== {label}: {n} steps, {kernels:.0f} kernels/step, span {span:.1f} µs, "
          f"kernels {busy:.1f} µs, gaps {span - busy:.1f} µs "
          f"({(span - busy) / max(kernels - 1, 1):.2f} µs per boundary)")
    by_name: dict[str, list[float]] = defaultdict(list)
    for s in steps:
        for name, _, dur in s:
            by_name[short(name)].append(dur)
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    print(f"{'kernel':60s} {'n/step':>7s} {'µs each':>8s} {'µs/step':>8s} {'share':>6s}")
    for name, durs in rows[:22]:
        per_step = sum(durs) / n
        print(f"{name:60s} {len(durs) / n:7.1f} {sum(durs) / len(durs):8.2f} {per_step:8.1f} "
              f"{per_step / span:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="20b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--contexts", type=ints, default=[4096, 32768])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    require_cuda()
    from torch.profiler import ProfilerActivity, profile

    cfg = preset(args.shape)
    weights = random_weights(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    engine = make_engine(weights, args.batch, max(args.contexts), graphs=True)
    for context in args.contexts:
        plan = decode_plan(args.batch, context)
        for _ in range(3):
            engine.step(plan)
        sync()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step(plan)
            sync()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        report(split_steps(kernel_events(path), gap_us=20.0),
               f"{args.shape} batch {args.batch} context {context}")


if __name__ == "__main__":
    main()
