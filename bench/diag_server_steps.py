"""Where a loaded server's time goes, step by step (GPU diagnostic; on the CPU a smoke test).

    python -m bench.diag_server_steps [--shape 20b] [--slots 512] [--concurrency 256,512] \
        [--requests 1536] [--time-limit 30] [--json OUT]

A real server over the real engine (random weights), the bench client in its own process as in
a deployment. The engine is wrapped so that every step records its host wall time, its GPU time
(CUDA events around it), its kind, rows and tokens, and the gap since the previous step returned
(the scheduler's own Python, handing outputs to the event loop, and waits for the GIL). With
overlapped scheduling a step's span runs from its launch to its collect, so spans overlap (the
gaps are negative); the GPU totals then say how busy the GPU was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.types import StepPlan, StepResult


@dataclass
class StepTrace:
    start: float  # perf_counter when Engine.step was entered
    end: float  # … and when it returned
    kind: str  # "graph" | "decode" (eager) | "mixed" | "prefill"
    rows: int
    tokens: int
    events: tuple | None  # CUDA events around the step (GPU time, read at the end)


class TracingEngine:
    """Engine.step with a trace of every call; everything else is the wrapped engine's."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self._engine = engine
        self._cuda = engine.device.type == "cuda"
        self.traces: list[StepTrace] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._engine, name)

    def step(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    # Overlapped scheduling calls the halves: a step's trace spans its launch to its collect; its
    # GPU time runs from the end of the work queued before it to the end of its own.
    def launch(self, plan: StepPlan) -> tuple:
        events = None
        if self._cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        t0 = time.perf_counter()
        handle = self._engine.launch(plan)
        if events is not None:
            events[1].record()
        return plan, handle, events, t0

    def collect(self, handle: tuple) -> StepResult:
        plan, inner, events, t0 = handle
        result = self._engine.collect(inner)
        t1 = time.perf_counter()
        decodes = sum(1 for w in plan.work if len(w.token_ids) == 1)
        if result.cuda_graph:
            kind = "graph"
        elif decodes == len(plan.work):
            kind = "decode"
        else:
            kind = "mixed" if decodes else "prefill"
        self.traces.append(StepTrace(t0, t1, kind, len(plan.work), plan.num_tokens, events))
        return result


def summarize(traces: list[StepTrace], wall_s: float) -> dict:
    """Per kind: steps, host wall and GPU ms per step; the gaps between steps; idle share."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gpu = [t.events[0].elapsed_time(t.events[1]) / 1e3 if t.events else None for t in traces]
    gaps = [b.start - a.end for a, b in zip(traces, traces[1:], strict=False)]
    out: dict = {"wall_s": wall_s, "steps": len(traces), "kinds": {}}
    for kind in ("graph", "decode", "mixed", "prefill"):
        idx = [i for i, t in enumerate(traces) if t.kind == kind]
        if not idx:
            continue
        walls = [traces[i].end - traces[i].start for i in idx]
        gpus = [gpu[i] for i in idx if gpu[i] is not None]
        out["kinds"][kind] = {
            "steps": len(idx),
            "total_s": sum(walls),
            "wall_ms": 1e3 * statistics.mean(walls),
            "gpu_ms": 1e3 * statistics.mean(gpus) if gpus else None,
            "rows": statistics.mean(traces[i].rows for i in idx),
            "tokens": statistics.mean(traces[i].tokens for i in idx),
            "gap_after_ms": 1e3 * statistics.mean(gaps[i] for i in idx if i < len(gaps))
            if any(i < len(gaps) for i in idx) else None,
        }
    busy = [g for g in gpu if g is not None]
    out["gap_total_s"] = sum(gaps)
    out["gap_ms_p50"] = 1e3 * statistics.median(gaps) if gaps else None
    out["engine_total_s"] = sum(t.end - t.start for t in traces)
    out["gpu_total_s"] = sum(busy) if busy else None
    return out


def print_summary(concurrency: int, s: dict, bench: dict) -> None:
    t = bench["throughput"]
    print(f"\n=== concurrency {concurrency}: {t['output_tok_s']:.0f} out tok/s "
          f"(steady {t.get('steady_output_tok_s') or 0:.0f}), ITL p50 {bench['itl']['p50']:.1f} ms, "
          f"{s['steps']} steps in {s['wall_s']:.1f} s of load")
    print(f"{'kind':<8} {'steps':>6} {'total s':>8} {'wall ms':>8} {'gpu ms':>8} {'rows':>6} "
          f"{'tokens':>7} {'gap ms':>7}")
    for kind, k in s["kinds"].items():
        g = "-" if k["gpu_ms"] is None else f"{k['gpu_ms']:.2f}"
        gap = "-" if k["gap_after_ms"] is None else f"{k['gap_after_ms']:.2f}"
        print(f"{kind:<8} {k['steps']:>6} {k['total_s']:>8.2f} {k['wall_ms']:>8.2f} {g:>8} "
              f"{k['rows']:>6.0f} {k['tokens']:>7.0f} {gap:>7}")
    gpu = "-" if s["gpu_total_s"] is None else f"{s['gpu_total_s']:.2f}"
    print(f"engine.step total {s['engine_total_s']:.2f} s, GPU total {gpu} s, "
          f"gaps between steps {s['gap_total_s']:.2f} s (p50 {s['gap_ms_p50'] or 0:.2f} ms)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="20b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--concurrency", default="256,512")
    ap.add_argument("--requests", type=int, default=1536)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--json", help="write every level's summary here")
    args = ap.parse_args()

    from service.config import ServerConfig
    from service.server import GIL_SWITCH_INTERVAL_S, BackgroundServer, build_engine

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `serve` does
    step_tokens = max(args.slots, 2048)
    config = ServerConfig(
        port=0, metrics_port=0, random_shape=args.shape, device=args.device, dtype=args.dtype,
        max_slots=args.slots, max_context=args.context, max_step_tokens=step_tokens,
        max_queue=4 * args.requests, cuda_graphs=not args.no_cuda_graphs,
    )
    t0 = time.perf_counter()
    engine = TracingEngine(build_engine(config))
    print(f"engine loaded and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    with BackgroundServer(config, engine=engine) as server, tempfile.TemporaryDirectory() as tmp:
        for conc in (int(c) for c in args.concurrency.split(",")):
            engine.traces.clear()
            out = Path(tmp) / f"load{conc}.json"
            t1 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "service.cli", "bench", "--server", server.target,
                 "--concurrency", str(conc), "--requests", str(args.requests),
                 "--time-limit", str(args.time_limit), "--json", str(out), "--no-progress"],
                check=False, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t1
            bench = json.loads(out.read_text())
            bench = bench.get("results", [bench])[0] if isinstance(bench, dict) else bench[0]
            s = summarize(list(engine.traces), wall)
            print_summary(conc, s, bench)
            results.append({"concurrency": conc, "summary": s, "throughput": bench["throughput"],
                            "itl": bench["itl"], "ttft": bench["ttft"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
