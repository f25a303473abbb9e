"""Compile every MoE kernel config for an H100 (sm_90a) on the CPU: no GPU needed.

    python -m bench.moe_compile [--configs all|default] [--sass DIR]

For each kernel: registers, spills, shared memory and a count of the SASS instructions that
matter for a memory-bound dequantizing GEMM (global loads, MMAs, conversions, integer ops), so a
config that does not compile, spills, or does needless work per weight byte is caught before any
GPU time is spent. Arguments are specialized as a real launch would (16-byte aligned pointers,
strides divisible by 16) at the gpt-oss-20b shapes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.moe_gemm_kernels as gemm
import kernels.moe_gemv as gemv
import kernels.moe_router as router
import kernels.moe_routing as routing
from bench.kernels_compile import defaults
from kernels.moe_configs import (
    DECODE_CANDIDATES,
    GEMV_CANDIDATES,
    PREFILL_CANDIDATES,
    MoEConfig,
)
from kernels.moe_configs_decode2 import DECODE2_CANDIDATES
from kernels.moe_configs_gemv import (
    GEMV2_CANDIDATES,
    GEMV_LOADSFIRST_CANDIDATES,
    GEMV_SCALEWORD_CANDIDATES,
    GEMV_WAVE_CANDIDATES,
)
from kernels.moe_configs_latency import LATENCY_CANDIDATES
from kernels.moe_configs_prefill import PREFILL2_CANDIDATES

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HID = INTER = 2880
ROW_SCALES = False  # --row-scales: the checkpoint's [E, N, G] scale layout
PDL = False  # --pdl: programmatic dependent launch (kernels/pdl.py)
E, K_TOP = 32, 4


def _compile(module, name: str, args: dict[str, object], num_warps: int, num_stages: int = 3,
             maxnreg: int | None = None):
    fn = module.jit.bound(False)[name]
    sig, consts, attrs = {}, {}, {}
    defaulted = defaults(fn)
    for i, arg in enumerate(fn.arg_names):
        v = args[arg] if arg in args else defaulted[arg]
        if isinstance(v, str):  # a pointer "*bf16"
            sig[arg], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, bool) or arg.isupper() and not isinstance(v, float):
            sig[arg], consts[arg] = "constexpr", v
        elif isinstance(v, float):
            sig[arg] = "fp32"
        elif v == 1:
            sig[arg], consts[arg] = "constexpr", 1
        else:
            sig[arg] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:  # GemmTiles.max_regs
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=opts)


SASS_OPS = ("LDG", "LDS", "STS", "LDSM", "HMMA", "HGMMA", "F2F", "F2FP", "I2F", "HADD2", "HMUL2",
            "FMUL", "LOP3", "SHF", "PRMT", "IMAD", "BAR", "LDGSTS", "SHFL")


def loop_body(sass: str) -> tuple[int, Counter]:
    """The longest backward branch's body: (instructions, op counts)."""
    best = (0, 0, 0)
    for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass):
        at, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < at and at - target > best[0]:
            best = (at - target, target, at)
    _LOOP[:] = best[1:]
    ops: Counter = Counter()
    for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass):
        if best[1] <= int(m.group(1), 16) <= best[2]:
            ops[m.group(2)] += 1
    return sum(ops.values()), ops


def placement(sass: str) -> str:
    """Where the main loop issues its loads: the first math instruction (F2FP/HFMA2/FFMA) from
    the loop's top, and how many 16-byte global loads come after it ("late": the step then
    waits on more than one dependent DRAM round trip)."""
    ops = [m.group(2) for m in re.finditer(
        r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
        if _LOOP[0] <= int(m.group(1), 16) <= _LOOP[1]]
    first = next((i for i, o in enumerate(ops) if o.split(".")[0] in ("F2FP", "HFMA2", "FFMA")),
                 len(ops))
    wide = [i for i, o in enumerate(ops) if o.startswith("LDG") and ".128" in o]
    return f"math@{first} late128={sum(i > first for i in wide)}/{len(wide)} "


_LOOP = [0, 0]  # the last loop_body's byte range


def report(kernel, label: str, sass_dir: Path | None, loop_bytes: int = 0) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        info = out.stderr
        cubin = Path(tmp) / "k.cubin"
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    ops = Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / f"{label}.sass").write_text(sass)
    counts = " ".join(f"{op}={ops[op]}" for op in SASS_OPS if ops[op])
    per_byte = ""
    if loop_bytes:
        n_loop, loop_ops = loop_body(sass)
        threads = kernel.metadata.num_warps * 32
        per_byte = f"loop={n_loop:>4} instr/B={n_loop * threads / loop_bytes:5.2f} "
        per_byte += placement(sass)
        counts = " ".join(f"{op}={loop_ops[op]}" for op in SASS_OPS if loop_ops[op])
    return (f"{label:<24} regs={regs.group(1) if regs else '?':>3} "
            f"spill={spill.group(1) if spill else '?':>4} smem={kernel.metadata.shared:>6} "
            f"{per_byte}{counts}")


def gemm_args(mc: MoEConfig, which: int, fast: bool) -> tuple[dict[str, object], object]:
    t = mc.gemm1 if which == 1 else mc.gemm2
    common = dict(W="*u8", S="*u8", B="*fp32", SORTED="*i32", TILE_E="*i32", TILE_START="*i32",
                  TILE_END="*i32", MAX_TILES=100, BLOCK_M=mc.block_m,
                  BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, SWAP_AB=t.swap_ab,
                  IEEE=False, FAST=fast, EMULATE=False, PDL=mc.pdl, PREFETCH=t.prefetch,
                  WIDE=t.wide_loads, SC_AHEAD=t.scale_ahead)
    ready = fast and t.act_ready  # activations stored fp16 in MMA order (moe_gemm_ready)
    if ready:
        common["READY"] = True
    if which == 1:
        g1 = HID // 32  # scales groups-major ([E, G, N] storage) unless --row-scales
        sn, sg = (g1, 1) if ROW_SCALES else (1, 2 * INTER)
        if ready:
            common["RND_BF16"] = True
        return dict(common, X="*fp16" if ready else "*bf16", OUT="*fp16" if fast else "*bf16", stride_x=HID,
                    stride_we=INTER * HID, stride_wn=HID // 2, stride_se=2 * INTER * g1,
                    stride_sn=sn, stride_sg=sg, stride_be=2 * INTER, stride_o=INTER,
                    N2=2 * INTER, K=HID,
                    alpha=1.702, limit=7.0, TOPK=K_TOP), t
    g2 = INTER // 32
    sn, sg = (g2, 1) if ROW_SCALES else (1, HID)
    return dict(common, A="*fp16" if fast else "*bf16", stride_a=INTER,
                stride_we=HID * INTER // 2, stride_wn=INTER // 2, stride_se=HID * g2,
                stride_sn=sn, stride_sg=sg, stride_be=HID, RW="*fp32", stride_split=4096 * HID,
                stride_o=HID, N=HID, K=INTER, SPLIT_K=t.split_k,
                OUT="*fp32" if t.split_k > 1 else "*bf16", POS="*i32", NUM_TILES="*i32",
                COUNTERS="*i32", FINAL="*bf16", stride_f=HID, T=7, ROWS=28, FUSE_COMBINE=mc.fuse_combine,
                TOPK=K_TOP, COMBINE_T=8), t


def gemv_args(which: int, dequant: str = "exact", scale_words: bool = False) -> dict[str, object]:
    """Runtime arguments of the GEMV kernels (lower-case sizes: not specialized as constants,
    as at a real launch); scales groups-major unless --row-scales. bf16 activations: the fast
    steps read x and act pre-split in fp32 ("f32") or fp16 ("f16"); scale_words: exponents as
    int32 words of 4 groups, words-major (kernels/moe_gemv_scales.py)."""
    deq = gemv._DEQ[dequant]
    xs = {0: "*bf16", 1: "*fp32", 2: "*i64"}[deq]  # f16: 4 fp16 per int64
    w, words = ("*i32", 4) if deq == 2 else ("*u8", 1)  # f16: int32 code words (4 per word)
    fast = dict(DEQ=deq, EMULATE=False)
    s_type, per = ("*i32", 4) if scale_words else ("*u8", 1)  # scale words: 4 groups each
    if which == 1:
        g1 = -(-HID // 32 // per)
        sn, sg = (g1, 1) if ROW_SCALES else (1, 2 * INTER)
        return dict(fast, X="*bf16", XS=xs, stride_x=HID // words, W=w,
                    stride_we=INTER * HID // words, stride_wn=HID // 2 // words,
                    S=s_type, stride_se=2 * INTER * g1, stride_sn=sn, stride_sg=sg, B="*fp32",
                    stride_be=2 * INTER, EXPERTS="*i32", ACT="*fp16" if deq == 2 else xs,
                    stride_a=INTER,
                    n2=2 * INTER, k_dim=HID, n_pairs=4, alpha=1.702, limit=7.0, TOPK=K_TOP)
    g2 = -(-INTER // 32 // per)
    sn, sg = (g2, 1) if ROW_SCALES else (1, HID)
    return dict(fast, A=xs, stride_a=INTER // words, W=w,
                stride_we=HID * INTER // 2 // words, stride_wn=INTER // 2 // words, S=s_type,
                stride_se=HID * g2, stride_sn=sn, stride_sg=sg,
                EXPERTS="*i32", PART="*fp32", stride_ps=4 * HID, stride_pp=HID, n_rows=HID,
                k_dim=INTER, n_pairs=4, k_per_split=INTER // 2)


def report_gemv(name: str, mc: MoEConfig, sass_dir: Path | None) -> None:
    assert mc.gemv is not None
    fuse = mc.gemv.fuse_combine
    for which, kname, t in ((1, "_gemv1_swiglu_kernel", mc.gemv.gemm1),
                            (2, "_gemv2_fused_kernel" if fuse else "_gemv2_kernel", mc.gemv.gemm2)):
        a = dict(gemv_args(which, t.dequant, t.scale_words), BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                 PREFETCH=3 if t.async_copy else 4 if t.loads_first else t.prefetch)
        if PDL:  # kernels/pdl.py: GEMM 2 prefetches its code rows (720 B: 32 sectors)
            a.update(PDL=True, **({"SECTORS": 32} if which == 2 and not fuse else {}))
        if which == 2:
            a["SPLIT_K"] = t.split_k
            if fuse:  # the combine's operands (kernels/moe_gemv_pipe.py)
                a.update(WEIGHTS="*fp32", B="*fp32", stride_be=HID, OUT="*bf16", stride_o=HID,
                         COUNTERS="*i32", TOPK=K_TOP)
        try:
            k = _compile(gemv, kname, a, t.num_warps, t.num_stages)
            steps = t.prefetch + 1  # the register look-ahead unrolls the loop that many steps
            print(report(k, f"{name}.gemv{which}", sass_dir, t.block_n * t.block_k // 2 * steps),
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            msg = str(exc).strip().splitlines()
            print(f"{name}.gemv{which}: FAILED {type(exc).__name__}: " + " | ".join(msg[-3:]),
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="all", help="all, or comma-separated names")
    ap.add_argument("--sass", type=Path, default=None, help="write each kernel's SASS here")
    ap.add_argument("--exact", action="store_true", help="the exact path instead of the fast one")
    ap.add_argument("--pdl", action="store_true",
                    help="the GEMVs and the router with programmatic dependent launch")
    ap.add_argument("--row-scales", action="store_true",
                    help="scales in the checkpoint's [E, N, G] layout (not prepare_moe's)")
    args = ap.parse_args(argv)
    global ROW_SCALES, PDL
    ROW_SCALES, PDL = args.row_scales, args.pdl
    # (GEMV_SPLIT_CANDIDATES are not here: their GEMM 1 is kernels/moe_gemv_split.py's.)
    configs = {**GEMV_CANDIDATES, **GEMV2_CANDIDATES, **GEMV_WAVE_CANDIDATES, **DECODE_CANDIDATES,
               **PREFILL_CANDIDATES, **LATENCY_CANDIDATES, **GEMV_SCALEWORD_CANDIDATES,
               **GEMV_LOADSFIRST_CANDIDATES, **PREFILL2_CANDIDATES, **DECODE2_CANDIDATES}
    if args.configs != "all":
        configs = {k: configs[k] for k in args.configs.split(",")}
    for name, mc in configs.items():
        if mc.gemv is not None:
            report_gemv(name, mc, args.sass)
            continue
        for which, kname in ((1, "_gemm1_swiglu_kernel"), (2, "_gemm2_scale_kernel")):
            a, t = gemm_args(mc, which, fast=mc.fast and not args.exact)
            try:
                k = _compile(gemm, kname, a, t.num_warps, t.num_stages, t.max_regs)
                loop_bytes = t.block_n * t.block_k // 2
                print(report(k, f"{name}.gemm{which}", args.sass, loop_bytes), flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on
                msg = str(exc).strip().splitlines()
                print(f"{name}.gemm{which}: FAILED {type(exc).__name__}: " + " | ".join(msg[-3:]),
                      flush=True)
    k = _compile(gemm, "_combine_kernel", dict(Y="*fp32", stride_split=4096 * HID, stride_y=HID,
                                               POS="*i32", OUT="*bf16", stride_o=HID, T=7,
                                               H=HID, TOPK=K_TOP, SPLIT_K=2, BLOCK_T=4, PDL=True,
                                               BLOCK_H=256), 4)
    print(report(k, "combine", args.sass))
    k = _compile(gemm, "_x_ready_kernel", dict(X="*bf16", stride_x=HID, XR="*fp16",
                                               stride_r=HID, T=4096, H=HID, BLOCK_T=8,
                                               BLOCK_H=256), 4)  # act_ready's x pass
    print(report(k, "x_ready", args.sass))
    # the routing kernels at the batch sizes the bench runs (T, E, BLOCK_M)
    for t, e, bm in ((1, 32, 16), (8, 32, 16), (64, 32, 16), (64, 128, 16), (256, 32, 32),
                     (256, 128, 16),
                     (4096, 32, 128), (4096, 128, 128)):
        n_tiles = routing.max_tiles(t, K_TOP, e, bm)
        lc = routing.RouteLaunch.of(t, e, K_TOP, n_tiles)
        a = dict(LOGITS="*bf16", stride_l=e, T=t, E=e, IDS="*i32", W="*fp32", HIST="*i32",
                 POS="*i32", SORTED="*i32", COUNTS="*i32", TILE_E="*i32", TILE_START="*i32",
                 TILE_END="*i32", NUM_TILES="*i32", MAX_TILES=n_tiles, PDL=False,
                 **lc.constexprs(K_TOP, bm))
        k = _compile(routing, "_topk_kernel", a, lc.num_warps)
        print(report(k, f"route.t{t}.e{e}", args.sass))
        if lc.nblocks > 1:
            b = dict(IDS="*i32", HIST="*i32", POS="*i32", SORTED="*i32", COUNTS="*i32",
                     TILE_E="*i32", TILE_START="*i32", TILE_END="*i32", NUM_TILES="*i32",
                     nblocks=lc.nblocks, TK=t * K_TOP, E=e, MAX_TILES=n_tiles, E_PAD=lc.e_pad,
                     CHUNK=lc.chunk, PAIRS_PER_BLOCK=lc.block_t * K_TOP, BLOCK_M=bm,
                     BLOCK_I=lc.block_i, PDL=False)
            k = _compile(routing, "_place_kernel", b, lc.num_warps)
            print(report(k, f"route.t{t}.e{e}.place", args.sass))
        elif router.fits(t, K_TOP, e):
            a = {key: v for key, v in a.items() if key not in ("LOGITS", "stride_l", "PDL")}
            t_pad = triton.next_power_of_2(t)
            a.update(PDL=PDL)
            a.update(X="*bf16", stride_x=HID, WG="*bf16", BG="*bf16", PART="*fp32",
                     LOGITS="*bf16", H=HID, COUNTER="*i32", XS="*fp32", stride_xs=HID,
                     R="*bf16", SC="*fp32", S_OUT="*bf16", Y_OUT="*bf16", stride_r=HID,
                     stride_s=HID, stride_y=HID, eps=0.0, NORM=False, HAS_RES=False, BLOCK_ROW=1,
                     WRITE_XS=True, T_PAD=t_pad, E_BLK=router.E_BLOCK,
                     H_SPLIT=router.H_SPLIT,
                     BLOCK_H=min(triton.next_power_of_2(triton.cdiv(HID, router.H_SPLIT)),
                                 8192 // (t_pad * router.E_BLOCK)))
            k = _compile(router, "_router_kernel", a, 4)
            print(report(k, f"router.t{t}.e{e}", args.sass))
            if t == 1:  # the opt-in one-token plan from registers (MoEConfig.router_fast_one)
                k = _compile(router, "_router_kernel", {**a, "FAST_ONE": True}, 4)
                print(report(k, f"router.t{t}.e{e}.fast1", args.sass))


if __name__ == "__main__":
    main()
