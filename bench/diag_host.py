"""Is an eager (mixed or prefill) step bound by the host or by the GPU? (GPU diagnostic)

    python -m bench.diag_host [--layers 4]

For a few scheduler-like steps: the wall time of Engine.step, the GPU's kernel time within it
(torch profiler), and the host's hottest Python functions (cProfile) for one step. When the wall
time is well above the kernel time, the GPU waits for Python: launches and per-layer glue.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

import torch

from bench.common import DEVICE, require_cuda, sync
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan


def plans(rng: random.Random) -> dict[str, StepPlan]:
    def dec(slots: range) -> list[SeqWork]:
        return [SeqWork(s, (5,), rng.randrange(100, 1900), sample=True) for s in slots]

    def chunk(slot: int, n: int, start: int = 0) -> SeqWork:
        return SeqWork(slot, tuple(rng.randrange(250) for _ in range(n)), start, sample=True)

    return {
        "255 decode + 73 prefill": StepPlan(tuple(dec(range(255)) + [chunk(255, 73)])),
        "7 decode + 332 prefill": StepPlan(tuple(dec(range(7)) + [chunk(7, 332)])),
        "64 decode + 2x200 prefill": StepPlan(tuple(dec(range(64)) + [chunk(64, 200),
                                                                    chunk(65, 200, 300)])),
        "1046 prefill, 4 seqs": StepPlan(tuple(chunk(s, n) for s, n in
                                               zip(range(4), (512, 300, 200, 34), strict=True))),
        "2048 prefill, 4 seqs": StepPlan(tuple(chunk(s, 512) for s in range(4))),
        # what the load bench's mixed steps carried at 512 streams (bench/diag_server_steps)
        "420 decode + 1400 prefill": StepPlan(tuple(dec(range(420)) + [
            chunk(420 + i, n) for i, n in enumerate((512, 400, 300, 188))])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", default="", help="run the plans whose name contains this")
    ap.add_argument("--kernels", type=int, default=0, help="print the N costliest GPU kernels")
    ap.add_argument("--no-step-graphs", action="store_true",
                    help="run the prompt-carrying steps eagerly (default: step graphs)")
    args = ap.parse_args()
    require_cuda()
    cfg = preset("20b").with_(num_hidden_layers=args.layers)
    weights = random_weights(cfg, seed=0, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(device=DEVICE, dtype="bfloat16", max_slots=512,
                                 max_context=2048, max_chunk_tokens=512, kernels="triton",
                                 step_graphs=not args.no_step_graphs),
                    weights=weights)
    engine.warmup(2048)
    print(f"step graphs: {sorted(engine.step_graphs.graphs) if engine.step_graphs else 'off'}")
    rows = []
    for name, plan in plans(random.Random(0)).items():
        if args.only not in name:
            continue
        for _ in range(2):
            engine.step(plan)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            engine.step(plan)
        sync()
        wall = (time.perf_counter() - t0) / 5 * 1e3
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step(plan)
            sync()
        gpu = sum(e.device_time_total for e in prof.key_averages()) / 1e3  # ms
        if args.kernels:
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.kernels,
                                            max_name_column_width=60))
        pr = cProfile.Profile()
        pr.enable()
        engine.step(plan)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
        rows.append((name, wall, gpu))
        print(f"== {name}: wall {wall:.2f} ms, GPU kernels {gpu:.2f} ms ({args.layers} layers)")
        print("\n".join(buf.getvalue().splitlines()[6:24]))
    print(f"\n{'step':<28} {'wall ms':>8} {'gpu ms':>8} {'wall/layer':>10} {'gpu/layer':>9}")
    for name, wall, gpu in rows:
        print(f"{name:<28} {wall:8.2f} {gpu:8.2f} {wall / args.layers:10.2f} "
              f"{gpu / args.layers:9.2f}")


if __name__ == "__main__":
    main()
