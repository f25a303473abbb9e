"""Decode throughput of the whole GPU path with random weights, beside its roofline.

    python -m bench.decode --shape 20b [--no-cuda-graphs] [--profile] [--overlap]

Single stream at contexts 1k, 4k, 32k, then a batch sweep 1 … max_slots at one context. A step
is Engine.step on a decode-only plan (graph replay when graphs are on, the host's sampling sync
included): tokens/s = batch ÷ step time. The KV cache is not prefilled: attention reads the same
bytes whatever the cache holds. Roofline: bench/roofline.decode_bytes ÷ measured copy bandwidth.
--overlap also times the steps as the server runs them (overlapped scheduling): step n+1 is
launched before step n's tokens are read, its rows reading the slot's last token on the device
(PREVIOUS_TOKEN), so the host's per-step work hides under the GPU's; recorded with
"overlap": true.
--profile prints the per-kernel CUDA time of a few eager steps (where the time goes).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from bench.common import DEVICE, measure_peaks, record, require_cuda, sync
from bench.roofline import decode_bytes
from kernels import pdl
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import random_weights
from runtime.types import PREVIOUS_TOKEN, SeqWork, StepPlan

# kernel candidates picked by name, recorded with each row (empty: the default)
SWITCH_NAMES = ("GPTOSS_ROPE_GEMV", "GPTOSS_ATTN_WINDOW", "GPTOSS_ATTN_FULL", "GPTOSS_PDL_PREFETCH")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def decode_plan(batch: int, context: int) -> StepPlan:
    """Each of `batch` slots feeds one token at position context − 1 (it attends `context` keys)."""
    return StepPlan(tuple(SeqWork(slot=i, token_ids=(1 + i,), start_pos=context - 1, sample=True)
                          for i in range(batch)))


def ahead_plan(batch: int, context: int) -> StepPlan:
    """decode_plan whose rows take the token their slot sampled in the step before."""
    return StepPlan(tuple(SeqWork(slot=i, token_ids=(PREVIOUS_TOKEN,), start_pos=context - 1,
                                  sample=True) for i in range(batch)))


def time_overlapped(engine: Engine, batch: int, context: int, steps: int) -> float:
    """Seconds per step when each step is launched before the previous one is collected."""
    engine.step(decode_plan(batch, context))  # every slot has sampled a token
    plan = ahead_plan(batch, context)
    for _ in range(3):
        engine.step(plan)
    sync()
    t0 = time.perf_counter()
    inflight = engine.launch(plan)
    for _ in range(steps - 1):
        nxt = engine.launch(plan)
        engine.collect(inflight)
        inflight = nxt
    engine.collect(inflight)
    return (time.perf_counter() - t0) / steps


def time_steps(engine: Engine, plan: StepPlan, steps: int) -> float:
    for _ in range(3):
        engine.step(plan)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(plan)  # ends with the host reading the tokens: a full step
    return (time.perf_counter() - t0) / steps


def profile(engine: Engine, plan: StepPlan, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from runtime.batch import build_batch

    def eager() -> None:
        batch = build_batch(plan, engine.device)
        logits = engine.model.forward(batch)
        engine.sampler.sample(logits, list(plan.work))

    eager()
    sync()
    activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as prof:
        for _ in range(3):
            eager()
        sync()
    key = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))


def make_engine(weights, slots: int, context: int, graphs: bool) -> Engine:  # noqa: ANN001
    cfg = EngineConfig(device=DEVICE, dtype="bfloat16", max_slots=slots, max_context=context,
                       max_chunk_tokens=256, cuda_graphs=graphs, kernels="triton")
    engine = Engine(cfg, weights=weights)
    engine.warmup()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="20b")
    parser.add_argument("--contexts", type=ints, default=[1024, 4096, 32768])
    parser.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--batch-context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-cuda-graphs", dest="graphs", action="store_false")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--overlap", action="store_true",
                        help="also time launch-ahead steps, as the overlapped server runs them")
    args = parser.parse_args()
    require_cuda()
    peaks = measure_peaks()
    cfg = preset(args.shape)
    print(f"peaks: copy {peaks.bandwidth / 1e12:.2f} TB/s, bf16 GEMM {peaks.gemm / 1e12:.0f} "
          f"TFLOP/s; shape {args.shape}, cuda graphs {'on' if args.graphs else 'off'}")
    weights = random_weights(cfg, seed=0, device=DEVICE, dtype=torch.bfloat16)

    def run(engine: Engine, batch: int, context: int) -> None:
        roof = batch * peaks.bandwidth / decode_bytes(cfg, batch, context)
        for overlap in (False, True) if args.overlap else (False,):
            t = (time_overlapped(engine, batch, context, args.steps) if overlap
                 else time_steps(engine, decode_plan(batch, context), args.steps))
            print(f"decode  batch {batch:3d}  context {context:6d}  {t * 1e3:8.3f} ms/step  "
                  f"{batch / t:9.1f} tok/s  roofline {roof:9.1f} tok/s  ({batch / t / roof:5.1%})"
                  f"{'  overlapped' if overlap else ''}")
            record("decode", {"bench": "decode", "shape": args.shape, "batch": batch,
                              "context": context, "tok_s": batch / t, "roofline_tok_s": roof,
                              "step_ms": t * 1e3, "cuda_graphs": args.graphs, "overlap": overlap,
                              "dense_gemv_rows": getattr(engine.model.ops, "dense_gemv_rows", 0),
                              "fuse_norm": getattr(engine.model.ops, "fuse_norm", False),
                              "fuse_rope": getattr(engine.model.ops, "fuse_rope", False),
                              "rope_attn": getattr(engine.model.ops, "rope_attn", False),
                              # the named kernel candidates in force (README's switches)
                              **{k.lower(): os.environ.get(k, "") for k in SWITCH_NAMES},
                              "pdl": pdl.enabled()})

    engine = make_engine(weights, 1, max(args.contexts), args.graphs)
    for context in args.contexts:
        run(engine, 1, context)
    if args.profile:
        profile(engine, decode_plan(1, 4096 if engine.max_context >= 4096 else 1024))
    if not args.batches:
        return
    del engine
    gc.collect()  # the graphs' pool and the cache go before the next engine allocates
    torch.cuda.empty_cache()
    engine = make_engine(weights, max(args.batches), args.batch_context, args.graphs)
    for batch in args.batches:
        if batch <= engine.max_slots:
            run(engine, batch, args.batch_context)
    if args.profile:
        profile(engine, decode_plan(engine.max_slots, args.batch_context))


if __name__ == "__main__":
    main()
