"""Compile the norm-prologue kernels (kernels/norm_prologue.py) for an H100 (sm_90a) on the CPU,
next to the same kernels without the prologue: registers, spills and shared memory.

    python -m bench.norm_compile [--sass DIR]

The dense GEMV at the qkv projection of gpt-oss (N 5120, K 2880, bf16) at M = 1, 2, 4, 8 (the
padded row counts) with the tiles a launch picks (choose_tiles, or choose_norm_tiles with the
prologue), the same with rope and the K/V cache write as its epilogue (kernels/dense_gemv_rope.py,
norm_linear_rope_small's launch), and the fused router at 1 and 8 tokens for E = 32 and 128 (20b / 120b), each without
the prologue, with it on the first layer (no residual) and with it and a residual. Arguments are
specialized as a real launch's would be; without the prologue the kernels compile to the same
SASS as before it existed (checked against the previous commit's kernels).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton

import kernels.dense_gemv as gemv
import kernels.dense_gemv_rope as gemv_rope
import kernels.moe_router as router
import kernels.moe_routing as routing
from bench.kernels_compile import BIN, P, build, c
from bench.kernels_compile import report as report_dense
from bench.moe_compile import _compile
from bench.moe_compile import report as report_moe
from kernels.dense_gemv_norm import choose_norm_tiles
from kernels.norm_prologue import row_block

HID, QKV = 2880, 5120
NORMS = {"plain": (False, False), "norm": (True, False), "norm+res": (True, True)}
SCALES = {"norm": "fp32", "norm+res": "fp32", "norm+res.scale_bf16": "bf16"}  # the GEMV's


def dense(m: int, norm: bool, res: bool, scale: str = "fp32"
          ) -> tuple[dict, gemv.GemvDenseTiles]:
    t = (choose_norm_tiles if norm else gemv.choose_tiles)(m, QKV, HID)
    bf = (P, "bf16")
    return dict(
        X=bf, W=bf, B=bf, Y=bf, M=3, N=QKV, K=HID, stride_xm=HID, stride_wn=HID, stride_ym=QKV,
        R=bf, SC=(P, scale), S_OUT=bf, stride_rm=HID, stride_sm=HID, eps=1e-5,
        M_P=c(16 if t.dot else m), BLOCK_N=c(t.block_n), BLOCK_K=c(t.block_k), VEC=c(8),
        HAS_BIAS=c(True), EVEN_K=c(HID % t.block_k == 0), DOT=c(t.dot),
        PREFETCH=c(not t.dot and t.num_stages > 1), PRECISION=c(None), NORM=c(norm),
        HAS_RES=c(res), BLOCK_ROW=c(row_block(HID) if norm else 1), PDL=c(False), SECTORS=c(0)), t


def rope(m: int, res: bool, scale: str = "fp32") -> tuple[dict, gemv.GemvDenseTiles]:
    """norm_linear_rope_small's launch at 20b (64 q heads, 8 KV heads, d 64; a 4096-row ring)."""
    t = choose_norm_tiles(m, QKV, HID)
    bf, cap = (P, "bf16"), 4096
    return dict(
        X=bf, W=bf, B=bf, QO=bf, M=3, K=HID, stride_xm=HID, stride_wn=HID, stride_qm=64 * 64,
        R=bf, SC=(P, scale), S_OUT=bf, stride_rm=HID, stride_sm=HID, eps=1e-5,
        COS=(P, "fp32"), SIN=(P, "fp32"), POS=(P, "i64"), SLOT=(P, "i64"), KC=bf, VC=bf, CAP=cap,
        skc_s=cap * 512, skc_c=512, skc_h=64, svc_s=cap * 512, svc_c=512, svc_h=64,
        NQ=c(64), NKV=c(8), HALF=c(32), M_P=c(m), PAIRS=c(t.block_n // 2), BLOCK_K=c(t.block_k),
        VEC=c(8), HAS_BIAS=c(True), EVEN_K=c(HID % t.block_k == 0),
        PREFETCH=c(t.num_stages > 1), HAS_RES=c(res), BLOCK_ROW=c(row_block(HID)), PDL=c(False),
        SECTORS=c(0)), t


def router_args(t: int, e: int, norm: bool, res: bool) -> tuple[dict, int]:
    n_tiles = routing.max_tiles(t, 4, e, 16)
    lc = routing.RouteLaunch.of(t, e, 4, n_tiles)
    t_pad = triton.next_power_of_2(t)
    block_h = router.block_h(t_pad, HID)
    a = dict(X="*bf16", stride_x=HID, WG="*bf16", BG="*bf16", PART="*fp32", LOGITS="*bf16",
             T=t, H=HID, E=e, IDS="*i32", W="*fp32", HIST="*i32", POS="*i32", SORTED="*i32",
             COUNTS="*i32", TILE_E="*i32", TILE_START="*i32", TILE_END="*i32",
             NUM_TILES="*i32", MAX_TILES=n_tiles, COUNTER="*i32", XS="*fp32", stride_xs=HID,
             R="*bf16", SC="*fp32", S_OUT="*bf16", Y_OUT="*bf16", stride_r=HID, stride_s=HID,
             stride_y=HID, eps=1e-5, T_PAD=t_pad, E_BLK=router.E_BLOCK, BLOCK_H=block_h,
             H_SPLIT=router.H_SPLIT, **lc.constexprs(4, 16), WRITE_XS=True, NORM=norm,
             HAS_RES=res, BLOCK_ROW=row_block(HID) if norm else 1)
    return a, router.num_warps(t_pad, block_h)


def usage(kernel) -> tuple[int, int]:  # noqa: ANN001 - a compiled Triton kernel
    """(registers, spill-store bytes) from ptxas for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        info = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas: {info[-400:]}")
    return int(regs.group(1)), int(spill.group(1))


def compile_dense(m: int, norm: bool, res: bool, scale: str = "fp32"):  # noqa: ANN201
    a, t = dense(m, norm, res, scale)
    return build(gemv, "_dense_gemv_kernel", a, t.num_warps, t.num_stages)


def compile_rope(m: int, res: bool, scale: str = "fp32"):  # noqa: ANN201
    a, t = rope(m, res, scale)
    return build(gemv_rope, "_gemv_rope_kernel", a, t.num_warps, t.num_stages)


def compile_router(t: int, e: int, norm: bool, res: bool):  # noqa: ANN201
    a, warps = router_args(t, e, norm, res)
    return _compile(router, "_router_kernel", a, warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, default=None, help="write each variant's SASS here")
    args = parser.parse_args()
    for m in (1, 2, 4, 8):
        for label in ("plain", *SCALES):
            norm, res = NORMS[label.split(".")[0]]
            k = compile_dense(m, norm, res, SCALES.get(label, "fp32"))
            print(report_dense(k, f"dense_gemv.qkv.M{m}.{label}", args.sass), flush=True)
        for label in SCALES:  # rope + K/V cache write as the epilogue (always the norm)
            k = compile_rope(m, NORMS[label.split(".")[0]][1], SCALES[label])
            print(report_dense(k, f"dense_gemv_rope.qkv.M{m}.{label}", args.sass), flush=True)
    for e in (32, 128):
        for t in (1, 8):
            for label, (norm, res) in NORMS.items():
                k = compile_router(t, e, norm, res)
                print(report_moe(k, f"router.t{t}.e{e}.{label}", args.sass), flush=True)


if __name__ == "__main__":
    main()
