"""Where serving steps lose time: kernel compiles after warm-up, and mixed-step cost (GPU diagnostic).

    python -m bench.diag_steps [--layers 4] [--steps 40] [--profile]

Builds the engine as `serve` does (20b shapes, fewer layers to keep it quick: a step's time scales
with the layer count), warms it up, then replays scheduler-like steps: up to 256 decode tokens at
random positions plus prefill chunks of ShareGPT-like lengths (some continuing a prompt, so with
earlier context), ≤ 2048 tokens in all. For every step it prints the wall time, and how many new
Triton kernel variants were compiled during it (a compile in the middle of serving is seconds of
TTFT). Then the same plans again, all compiled: the steady-state cost of each kind of step.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bench.common import DEVICE, require_cuda, sync
from kernels.jit import compiled_variants
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan


def random_plan(rng: random.Random, slots: int, context: int, step_tokens: int,
                chunk: int) -> StepPlan:
    n_dec = rng.choice([0, 1, 7, 31, 64, 129, 200, 255])
    used = rng.sample(range(slots), slots)
    works, budget = [], step_tokens
    for s in used[:n_dec]:
        works.append(SeqWork(slot=s, token_ids=(rng.randrange(250),),
                             start_pos=rng.randrange(8, context - 8), sample=True))
        budget -= 1
    for s in used[n_dec:]:
        if budget <= 0 or rng.random() < 0.15:
            break
        n = min(budget, chunk, max(1, int(rng.lognormvariate(5.3, 1.0))))
        start = 0 if rng.random() < 0.7 else rng.randrange(0, context - n - 1)
        works.append(SeqWork(slot=s, token_ids=tuple(rng.randrange(250) for _ in range(n)),
                             start_pos=start, sample=start + n > 0))
        budget -= n
    if not works:
        works.append(SeqWork(slot=used[0], token_ids=(1,), start_pos=100, sample=True))
    return StepPlan(tuple(works))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--step-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    require_cuda()
    cfg = preset("20b").with_(num_hidden_layers=args.layers)
    weights = random_weights(cfg, seed=0, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(device=DEVICE, dtype="bfloat16", max_slots=args.slots,
                                 max_context=args.context, max_chunk_tokens=args.chunk,
                                 kernels="triton"), weights=weights)
    t0 = time.perf_counter()
    engine.warmup(args.step_tokens)
    print(f"warm-up {time.perf_counter() - t0:.1f}s; variants: {sum(compiled_variants().values())}")
    rng = random.Random(0)
    plans = [random_plan(rng, engine.max_slots, engine.max_context, args.step_tokens, args.chunk)
             for _ in range(args.steps)]
    first: list[float] = []
    print(f"{'step':>4} {'dec':>4} {'pref_seqs':>9} {'tokens':>6} {'ms':>9} new_variants")
    for i, plan in enumerate(plans):
        before = compiled_variants()
        sync()
        t = time.perf_counter()
        engine.step(plan)
        sync()
        ms = (time.perf_counter() - t) * 1e3
        first.append(ms)
        after = compiled_variants()
        new = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        dec = sum(1 for w in plan.work if len(w.token_ids) == 1)
        toks = sum(len(w.token_ids) for w in plan.work)
        print(f"{i:4d} {dec:4d} {len(plan.work) - dec:9d} {toks:6d} {ms:9.1f} {new or ''}")
    print("== the same steps again (compiled) ==")
    print(f"{'step':>4} {'dec':>4} {'pref_seqs':>9} {'tokens':>6} {'first_ms':>9} {'again_ms':>9} "
          f"{'ms/layer':>8}")
    for i, plan in enumerate(plans):
        sync()
        t = time.perf_counter()
        engine.step(plan)
        sync()
        ms = (time.perf_counter() - t) * 1e3
        dec = sum(1 for w in plan.work if len(w.token_ids) == 1)
        toks = sum(len(w.token_ids) for w in plan.work)
        print(f"{i:4d} {dec:4d} {len(plan.work) - dec:9d} {toks:6d} {first[i]:9.1f} {ms:9.1f} "
              f"{ms / args.layers:8.2f}")
    if args.profile:
        from bench.decode import profile

        heavy = max(plans, key=lambda p: sum(len(w.token_ids) for w in p.work))
        profile(engine, heavy)
        # host side: the same step with the CPU activity too, to see Python overhead
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step(heavy)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
