"""Decode attention with rope fused (kernels/decode_rope_attention.py) against the plain fused-merge
decode kernel, compiled for an H100 (sm_90a) on the CPU: registers and spills per launch shape.

    python -m bench.decode_rope_compile [--sass DIR]

At the 20b heads (64 q, 8 KV, d 64; q/k/v views of the 5120-wide qkv row) on a full layer (32k
capacity, 33 splits) and a sliding one (window 128, a 255-entry ring, one split), for SERVING and
the kernels/decode_latency.py candidates of that layer kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import triton

import kernels.decode_rope_attention as dra
import kernels.decode_variants as var
from bench.kernels_compile import P, build, c, fused_decode
from bench.norm_compile import usage
from kernels.decode_latency import FULL, WINDOW

LAYERS = {"full": (0, 32768, 33), "window": (128, 255, 1)}  # window, capacity, splits


def rope_args(cfg: var.DecodeVariant, window: int, cap: int, splits: int,
              pdl_on: bool = False) -> dict[str, object]:
    bf, f32, i64, i32 = (P, "bf16"), (P, "fp32"), (P, "i64"), (P, "i32")
    sp = triton.next_power_of_2(cfg.max_splits)
    return dict(
        Q=bf, K=bf, V=bf, COS=f32, SIN=f32, KC=bf, VC=bf, SLOT=i64, POS=i64, SINK=f32, OUT=bf,
        PM=f32, PL=f32, PACC=f32, CNT=i32, sq_b=5120, sq_h=64, sk_b=5120, sk_h=64, sv_b=5120,
        sv_h=64, skc_s=cap * 512, skc_c=512, skc_h=64, svc_s=cap * 512, svc_c=512, svc_h=64,
        so_b=4096, so_h=64, CAP=cap, qk_scale=0.18, NQ=64, NKV=8, SPLITS=splits,
        WINDOW=c(window), G=c(8), G_P=c(16), G_M=c(8), D=c(64), HALF_P=c(32),
        BLOCK_N=c(cfg.block_n), SPLITS_P=c(sp),
        MERGE_S=c(min(sp, cfg.merge_splits or var.MERGE_FLOATS // (8 * 64))),
        KV_TOGETHER=c(cfg.kv_together), PRECISION=c(None), PDL=c(pdl_on),
        SINK_FIRST=c(cfg.sink_first), MERGE_ONCE=c(cfg.merge_once), EARLY_SLOT=c(cfg.early_slot))


def compile_rope_decode(cfg: var.DecodeVariant, layer: str, pdl_on: bool = False):  # noqa: ANN201
    window, cap, splits = LAYERS[layer]
    return build(dra, "_rope_decode_kernel", rope_args(cfg, window, cap, splits, pdl_on),
                 cfg.num_warps, cfg.num_stages)


def compile_plain(cfg: var.DecodeVariant, layer: str):  # noqa: ANN201
    _, module, name, args, warps, stages = fused_decode("plain", cfg, LAYERS[layer][0], False)
    return build(module, name, args, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, default=None, help="write each variant's SASS here")
    args = parser.parse_args()
    for layer, table in (("full", FULL), ("window", WINDOW)):
        for name, cfg in {"serving": var.SERVING, **table}.items():
            plain, fused = compile_plain(cfg, layer), compile_rope_decode(cfg, layer)
            (pr, ps), (fr, fs) = usage(plain), usage(fused)
            print(f"{layer:<6} {name:<20} plain regs={pr:>3} spill={ps:>3}   "
                  f"rope regs={fr:>3} spill={fs:>3}", flush=True)
            if args.sass is not None:
                from bench.rope_compile import sass_of

                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"rope_decode.{layer}.{name}.sass").write_text(sass_of(fused))


if __name__ == "__main__":
    main()
