"""Decode steps as serving makes them vs as bench.decode makes them (GPU diagnostic).

    python -m bench.diag_decode_mix [--batches 64,256]

bench.decode times greedy rows all at one position; a server's rows sample (temperature 1,
seeded) at scattered positions. Same engine, graphs on, 24 layers of 20b: the step time of each.
"""

from __future__ import annotations

import argparse
import random

import torch

from bench.common import DEVICE, require_cuda
from bench.decode import ints, time_steps
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import random_weights
from runtime.types import GREEDY, SamplingParams, SeqWork, StepPlan


def plan(batch: int, positions: list[int], sampled: bool) -> StepPlan:
    return StepPlan(tuple(
        SeqWork(slot=i, token_ids=(1 + i,), start_pos=positions[i], sample=True,
                sampling=SamplingParams(temperature=1.0, seed=i) if sampled else GREEDY)
        for i in range(batch)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=ints, default=[64, 256])
    args = ap.parse_args()
    require_cuda()
    cfg = preset("20b")
    weights = random_weights(cfg, seed=0, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(device=DEVICE, dtype="bfloat16", max_slots=max(args.batches),
                                 max_context=2048, max_chunk_tokens=512, kernels="triton"),
                    weights=weights)
    engine.warmup(2048)
    rng = random.Random(0)
    for b in args.batches:
        same = [1023] * b
        scattered = [rng.randrange(100, 2000) for _ in range(b)]
        for name, pos, sampled in (("greedy, one position", same, False),
                                   ("temperature 1, one position", same, True),
                                   ("greedy, scattered positions", scattered, False),
                                   ("temperature 1, scattered", scattered, True)):
            t = time_steps(engine, plan(b, pos, sampled), 20)
            print(f"batch {b:4d}  {name:<30} {t * 1e3:8.2f} ms/step  {b / t:8.0f} tok/s",
                  flush=True)


if __name__ == "__main__":
    main()
