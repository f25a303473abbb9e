"""Prefill throughput of the whole GPU path with random weights, beside its roofline.

    python -m bench.prefill --shape 20b [--profile]

One request's prompt of 1k, 4k, 16k tokens as a single chunk (Engine.step, eager as in serving,
the first token sampled): tokens/s = prompt ÷ step time. Roofline: bench/roofline.prefill_flops ÷
the measured bf16 GEMM rate. --profile prints the per-kernel CUDA time of one 4k prefill.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import DEVICE, measure_peaks, record, require_cuda, sync
from bench.decode import ints
from bench.roofline import prefill_flops
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan


def prefill_plan(prompt: int, vocab: int) -> StepPlan:
    tokens = tuple((7 * i + 3) % vocab for i in range(prompt))
    return StepPlan((SeqWork(slot=0, token_ids=tokens, start_pos=0, sample=True),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="20b")
    parser.add_argument("--prompts", type=ints, default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    require_cuda()
    peaks = measure_peaks()
    cfg = preset(args.shape)
    print(f"peaks: copy {peaks.bandwidth / 1e12:.2f} TB/s, bf16 GEMM {peaks.gemm / 1e12:.0f} "
          f"TFLOP/s; shape {args.shape}")
    weights = random_weights(cfg, seed=0, device=DEVICE, dtype=torch.bfloat16)
    longest = max(args.prompts)
    engine = Engine(EngineConfig(device=DEVICE, dtype="bfloat16", max_slots=1,
                                 max_context=longest + 1, max_chunk_tokens=longest,
                                 cuda_graphs=False, kernels="triton"), weights=weights)
    engine.warmup()
    for prompt in args.prompts:
        plan = prefill_plan(prompt, cfg.vocab_size)
        engine.step(plan)  # compiles this shape's kernels
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            engine.step(plan)
        t = (time.perf_counter() - t0) / args.repeats
        roof = prompt * peaks.gemm / prefill_flops(cfg, prompt)
        print(f"prefill prompt {prompt:6d}  {t * 1e3:9.2f} ms  {prompt / t:10.0f} tok/s  "
              f"roofline {roof:10.0f} tok/s  ({prompt / t / roof:5.1%})")
        record("prefill", {"bench": "prefill", "shape": args.shape, "batch": 1, "prompt": prompt,
                           "tok_s": prompt / t, "roofline_tok_s": roof, "step_ms": t * 1e3})
    if args.profile:
        from bench.decode import profile

        profile(engine, prefill_plan(min(4096, longest), cfg.vocab_size))


if __name__ == "__main__":
    main()
