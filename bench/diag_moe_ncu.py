"""A few MoE layer calls at one batch size, for `ncu` to profile (GPU diagnostic).

    ncu --clock-control none -k regex:'gemv|gemm' --launch-skip 6 --launch-count 3 \
        --section SpeedOfLight --section WarpStateStats python -m bench.diag_moe_ncu --tokens 64

Two layers of 20b (or 120b: --experts 128) shape alternate so the weights stream from HBM as in
the model.
"""

from __future__ import annotations

import argparse

import torch

from kernels.moe import moe_forward, prepare_moe
from runtime.config import ModelConfig
from runtime.synthetic import random_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    cfg = ModelConfig(num_hidden_layers=2, num_experts=args.experts)
    layers = [random_layer(cfg, j, seed=1, device="cuda", dtype=torch.bfloat16) for j in range(2)]
    prepared = [prepare_moe(la) for la in layers]
    x = torch.randn(args.tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
    for i in range(args.calls):
        moe_forward(x, layers[i % 2], cfg, prepared[i % 2])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
