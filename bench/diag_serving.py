"""The serving stack's own cost per step: a real gRPC server over an engine that does no work.

    python -m bench.diag_serving [--concurrency 64,256] [--step-ms 10] [--requests 512]

The null engine answers every StepPlan at once (after sleeping --step-ms, as a GPU wait releases
the GIL; launched steps queue like GPU work, so overlapped scheduling overlaps them with the host);
everything else is the real service: scheduler, detokenization, stop checks, the
engine thread handing outputs to the asyncio loop, gRPC streams, and the bench client. With a
step time s, a batch of B streams could reach B / s tokens/s; the shortfall, and ITL − s, are what
Python costs per step at that batch size. Runs on the CPU (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.config import ModelConfig
from runtime.tokenizer import Tokenizer
from runtime.types import SampledToken, StepPlan, StepResult


class NullEngine:
    """Engine.step's contract with no model: token 100 + (position % 50) for every sampled row."""

    prefix_reuse_slack = 0

    def __init__(self, max_slots: int, max_context: int, step_s: float) -> None:
        self.max_slots, self.max_context, self.max_chunk_tokens = max_slots, max_context, 512
        self.model_config = ModelConfig(vocab_size=259, eos_token_ids=(258,))
        self.tokenizer = Tokenizer.byte_level(259)
        self.step_s = step_s
        self.engine_s = 0.0  # GPU-busy seconds
        self._busy_until = 0.0

    def step(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    # Overlapped scheduling's halves, as a GPU queue behaves: a launched step starts when the
    # one before it ends and takes step_s; collect waits (GIL released) until it has.
    def launch(self, plan: StepPlan) -> tuple[StepPlan, float]:
        now = time.perf_counter()
        start = max(now, self._busy_until)
        self._busy_until = start + self.step_s
        self.engine_s += self.step_s
        return plan, self._busy_until

    def collect(self, handle: tuple[StepPlan, float]) -> StepResult:
        plan, ready = handle
        wait = ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        out = tuple(SampledToken(w.slot, 100 + w.end_pos % 50) for w in plan.work if w.sample)
        kind = "decode" if plan.is_decode_only else "prefill"
        return StepResult(out, kind=kind, duration_s=self.step_s, num_tokens=plan.num_tokens)


def run(concurrency: int, requests: int, step_s: float, overlap: bool = True) -> dict:
    """The server here (its engine thread and event loop), the bench client in its own process
    as in a real deployment, so the client's Python does not share this process's GIL."""
    from service.config import ServerConfig
    from service.server import BackgroundServer

    engine = NullEngine(max(concurrency, 8), 2048, step_s)
    config = ServerConfig(port=0, metrics_port=0, max_slots=engine.max_slots,
                          max_context=2048, max_step_tokens=2048, max_queue=2 * requests,
                          overlap_scheduling=overlap)
    with BackgroundServer(config, engine=engine) as server, \
            tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "service.cli", "bench", "--server", server.target,
                        "--concurrency", str(concurrency), "--requests", str(requests),
                        "--json", str(out), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        result = json.loads(out.read_text())
        result = result[0] if isinstance(result, list) else result
        result = result.get("results", [result])[0] if "results" in result else result
        result["engine_busy"] = engine.engine_s / wall
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--no-overlap", action="store_true", help="sequential scheduling")
    args = ap.parse_args()
    print(f"{'conc':>5} {'step ms':>8} {'out tok/s':>10} {'steady':>8} {'ideal':>8} {'itl p50':>8} "
          f"{'engine busy':>11} {'client cpu':>10}")
    for c in (int(x) for x in args.concurrency.split(",")):
        r = run(c, args.requests, args.step_ms / 1e3, overlap=not args.no_overlap)
        t = r["throughput"]
        print(f"{c:>5} {args.step_ms:>8.1f} {t['output_tok_s']:>10.0f} "
              f"{t.get('steady_output_tok_s') or 0:>8.0f} "
              f"{c / (args.step_ms / 1e3):>8.0f} {r['itl']['p50']:>8.1f} "
              f"{r['engine_busy']:>11.0%} {r.get('client_cpu_util') or 0:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
