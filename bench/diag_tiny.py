"""Diagnostic: every Triton op against its torch reference on the tiny preset (GPU).

    python -m bench.diag_tiny

Prints the relative error of each op and each MoE configuration, in bf16 and fp32.
"""

from __future__ import annotations

import torch

from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.moe import moe_forward, prepare_moe
from kernels.moe_configs import DECODE, GEMV_FEW, GEMV_MANY, MIDDLE, PREFILL
from kernels.moe_ref import moe_ref
from kernels.prefill_attention import prefill_attention, prefill_attention_ref
from runtime.config import preset
from runtime.synthetic import random_layer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main() -> None:
    cfg = preset("tiny")
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        layer = random_layer(cfg, 1, seed=0, device=dev, dtype=dtype)
        prep = prepare_moe(layer)
        for t in (1, 2, 16, 64, 300):
            x = torch.randn(t, cfg.hidden_size, device=dev, dtype=dtype)
            ref = moe_ref(x, layer.gate_weight, layer.gate_bias, layer.mlp1_blocks,
                          layer.mlp1_scales, layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales,
                          layer.mlp2_bias, cfg.experts_per_token)
            for name, mc in (("auto", None), ("gemv_few", GEMV_FEW), ("gemv_many", GEMV_MANY),
                             ("decode", DECODE), ("middle", MIDDLE), ("prefill", PREFILL)):
                try:
                    y = moe_forward(x, layer, cfg, prep, mc)
                    print(f"moe {dtype} T={t} {name}: rel {rel(y, ref):.2e}")
                except Exception as exc:  # noqa: BLE001 - a diagnostic prints every failure
                    print(f"moe {dtype} T={t} {name}: ERROR {type(exc).__name__}: {exc}"[:200])
        nq, nkv, d, cap, slots = 4, 2, 16, 64, 3
        kc = torch.randn(slots + 1, cap, nkv, d, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        sinks = torch.randn(nq, device=dev)
        for window in (0, 16):
            q = torch.randn(3, nq, d, device=dev, dtype=dtype)
            sl = torch.tensor([0, 1, 2], device=dev)
            pos = torch.tensor([5, 40, 63], device=dev)
            a = decode_attention(q, kc, vc, sl, pos, sinks, window, d**-0.5)
            b = decode_attention_ref(q, kc, vc, sl, pos, sinks, window, d**-0.5)
            print(f"decode_attn {dtype} window={window}: rel {rel(a, b):.2e}")
            q = torch.randn(30, nq, d, device=dev, dtype=dtype)
            args = ([0, 7, 30], [0, 2], [3, 20], sinks, window, d**-0.5)
            a = prefill_attention(q, kc, vc, *args)
            b = prefill_attention_ref(q, kc, vc, *args)
            print(f"prefill_attn {dtype} window={window}: rel {rel(a, b):.2e}")


if __name__ == "__main__":
    main()
