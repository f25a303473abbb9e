"""Compile every attention/norm/rope/sampling/dense-GEMV kernel variant for an H100 (sm_90a), on
the CPU.

    python -m bench.kernels_compile [--sass DIR]

No GPU needed: catches kernels that only the compiler (not the interpreter) rejects, and reports
registers, spills and shared memory per variant at the gpt-oss-20b shapes, with arguments
specialized as a real launch would (16-byte aligned pointers, strides divisible by 16).
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.decode_attention as dec
import kernels.decode_latency as lat
import kernels.decode_variants as var
import kernels.dense_gemv as gemv
import kernels.prefill_attention as pre
import kernels.rmsnorm as norm
import kernels.rope as rope
import kernels.sampling as samp

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
P = "ptr"  # marks a pointer argument; its element type follows


def defaults(fn) -> dict[str, object]:  # noqa: ANN001 - a triton.jit function
    """The kernel's defaulted arguments (constexprs such as PDL): a compile that does not name
    one gets the value a launch that does not pass it gets."""
    return {k: p.default for k, p in inspect.signature(fn.fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def build(module, name: str, args: dict[str, object], num_warps: int, num_stages: int = 2):  # noqa: ANN001, ANN201
    fn = module.jit.bound(False)[name]
    sig, consts, attrs = {}, {}, {}
    defaulted = defaults(fn)
    for i, arg in enumerate(fn.arg_names):
        v = args[arg] if arg in args else ("const", defaulted[arg])
        if isinstance(v, tuple) and v[0] == P:
            sig[arg], attrs[(i,)] = "*" + v[1], [["tt.divisibility", 16]]
        elif isinstance(v, tuple) and v[0] == "const":
            sig[arg], consts[arg] = "constexpr", v[1]
        elif isinstance(v, float):
            sig[arg] = "fp32"
        elif isinstance(v, int) and v == 1:
            sig[arg], consts[arg] = "constexpr", 1
        elif isinstance(v, int):
            sig[arg] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}.{arg}: {v!r}")
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def report(kernel, label: str, sass_dir: Path | None) -> str:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cubin = Path(tmp) / "k.cubin"
        info = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                               str(cubin)], capture_output=True, text=True).stderr
        if sass_dir is not None:
            sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True).stdout
            sass_dir.mkdir(parents=True, exist_ok=True)
            (sass_dir / f"{label}.sass").write_text(sass)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    mma = kernel.asm["ptx"].count("wgmma.mma_async") + kernel.asm["ptx"].count("mma.sync")
    return (f"{label:<34} regs={regs.group(1) if regs else '?':>3} "
            f"spill={spill.group(1) if spill else '?':>4} smem={kernel.metadata.shared:>6} "
            f"mma_instr={mma}")


def c(v: object) -> tuple[str, object]:
    return ("const", v)


def fused_decode(label: str, cfg: var.DecodeVariant, window: int, pdl_on: bool) -> tuple:
    """The one-launch decode attention with cfg's launch shape at 20b heads, 32k capacity."""
    bf, f32, i64, i32 = (P, "bf16"), (P, "fp32"), (P, "i64"), (P, "i32")
    sp = triton.next_power_of_2(cfg.max_splits)
    return (label, var, "_fused_decode_kernel", dict(
        Q=bf, KC=bf, VC=bf, SLOT=i64, POS=i64, SINK=f32, OUT=bf, PM=f32, PL=f32, PACC=f32,
        CNT=i32, sq_b=4096, sq_h=64, skc_s=32768 * 512, skc_c=512, skc_h=64,
        svc_s=32768 * 512, svc_c=512, svc_h=64, so_b=4096, so_h=64, CAP=32768,
        qk_scale=0.18, NQ=64, NKV=8, SPLITS=33, WINDOW=c(window), G=c(8), G_P=c(16), G_M=c(8),
        D=c(64), BLOCK_N=c(cfg.block_n), SPLITS_P=c(sp),
        MERGE_S=c(min(sp, cfg.merge_splits or var.MERGE_FLOATS // (8 * 64))),
        KV_TOGETHER=c(cfg.kv_together), PRECISION=c(None), PDL=c(pdl_on),
        SINK_FIRST=c(cfg.sink_first), MERGE_ONCE=c(cfg.merge_once),
        EARLY_SLOT=c(cfg.early_slot)), cfg.num_warps, cfg.num_stages)


def variants() -> list[tuple[str, object, str, dict, int, int]]:
    bf, f32, i64, i32 = (P, "bf16"), (P, "fp32"), (P, "i64"), (P, "i32")
    out = []
    for res in (True, False):
        out.append((f"rmsnorm res={res}", norm, "_rmsnorm_kernel", dict(
            X=bf, R=bf, S=bf, Y=bf, W=f32, stride_x=2880, stride_r=2880, stride_s=2880,
            stride_y=2880, H=2880, eps=1e-5, HAS_RESIDUAL=c(res), BLOCK=c(4096)), 8, 1))
    out.append(("rope_cache_write", rope, "_rope_cache_write_kernel", dict(
        Q=bf, K=bf, V=bf, COS=f32, SIN=f32, POS=i64, SLOT=i64, KC=bf, VC=bf, QO=bf,
        sq_t=5120, sq_h=64, sk_t=5120, sk_h=64, sv_t=5120, sv_h=64, skc_s=4096 * 512,
        skc_c=512, skc_h=64, svc_s=4096 * 512, svc_c=512, svc_h=64, sqo_t=4096, sqo_h=64,
        CAP=4096, NQ=64, NKV=8, HALF=c(32), NQ_P=c(64), NKV_P=c(8), BLOCK_D=c(32)), 4, 1))
    out.append(("rope_cache_write pdl", rope, "_rope_cache_write_kernel", dict(
        Q=bf, K=bf, V=bf, COS=f32, SIN=f32, POS=i64, SLOT=i64, KC=bf, VC=bf, QO=bf,
        sq_t=5120, sq_h=64, sk_t=5120, sk_h=64, sv_t=5120, sv_h=64, skc_s=4096 * 512,
        skc_c=512, skc_h=64, svc_s=4096 * 512, svc_c=512, svc_h=64, sqo_t=4096, sqo_h=64,
        CAP=4096, NQ=64, NKV=8, HALF=c(32), NQ_P=c(64), NKV_P=c(8), BLOCK_D=c(32), PDL=c(True)),
        4, 1))
    for window, splits in ((0, 33), (0, 1), (128, 1)):
        for block_n in (64, 128):
            out.append((f"decode W={window} S={splits} BN={block_n}", dec, "_decode_kernel", dict(
                Q=bf, KC=bf, VC=bf, SLOT=i64, POS=i64, SINK=f32, OUT=bf, PM=f32, PL=f32,
                PACC=f32, sq_b=4096, sq_h=64, skc_s=32768 * 512, skc_c=512, skc_h=64,
                svc_s=32768 * 512, svc_c=512, svc_h=64, so_b=4096, so_h=64, CAP=32768,
                qk_scale=0.18, NQ=64, WINDOW=c(window), G=c(8), G_P=c(16), D=c(64),
                BLOCK_N=c(block_n), SPLITS=c(splits), SPLITS_P=c(triton.next_power_of_2(splits)),
                PRECISION=c(None)), 4, 2))
    for pdl_on in (False, True):  # the serving decode (kernels/decode_variants.SERVING)
        out.append(fused_decode(f"fused_decode W=0 S=33 pdl={pdl_on}", var.SERVING, 0, pdl_on))
    for kind, window in (("window", 128), ("full", 0)):  # kernels/decode_latency.py
        for name, cfg in getattr(lat, kind.upper()).items():
            out.append(fused_decode(f"fused_decode {kind} {name}", cfg, window, False))
    out.append(("decode merge S=33", dec, "_merge_kernel", dict(
        POS=i64, SINK=f32, OUT=bf, PM=f32, PL=f32, PACC=f32, so_b=4096, so_h=64, NQ=64,
        WINDOW=c(0), D=c(64), BLOCK_N=c(64), SPLITS=c(33), SPLITS_P=c(64)), 4, 1))
    for window in (0, 128):
        for block_n, warps, stages in ((64, 4, 2), (64, 8, 3), (128, 8, 2)):
            out.append((f"prefill W={window} BN={block_n} w={warps} s={stages}", pre,
                        "_prefill_kernel", dict(
                Q=bf, KC=bf, VC=bf, TILES=i32, SINK=f32, OUT=bf, sq_t=4096, sq_h=64,
                skc_s=4096 * 512, skc_c=512, skc_h=64, svc_s=4096 * 512, svc_c=512, svc_h=64,
                so_t=4096, so_h=64, CAP=4096, qk_scale=0.18, WINDOW=c(window), G=c(8), G_P=c(8),
                BLOCK_T=c(16), D=c(64), BLOCK_N=c(block_n), PRECISION=c(None)), warps, stages))
    for gname, t in gemv.CANDIDATES.items():
        for m_p in (1, 8):  # M is not specialized (an odd value stands in), the strides are
            out.append((f"dense_gemv {gname} M={m_p}", gemv, "_dense_gemv_kernel", dict(
                X=bf, W=bf, B=bf, Y=bf, M=3, N=5120, K=2880, stride_xm=2880, stride_wn=2880,
                stride_ym=5120, R=bf, SC=f32, S_OUT=bf, stride_rm=2880, stride_sm=2880, eps=0.0,
                M_P=c(16 if t.dot else m_p), BLOCK_N=c(t.block_n),
                BLOCK_K=c(t.block_k), VEC=c(8), HAS_BIAS=c(True), EVEN_K=c(2880 % t.block_k == 0),
                DOT=c(t.dot), PREFETCH=c(not t.dot and t.num_stages > 1), PRECISION=c(None),
                NORM=c(False), HAS_RES=c(False), BLOCK_ROW=c(1), PDL=c(False), SECTORS=c(0)),
                t.num_warps, t.num_stages))
    # programmatic dependent launch: the weight-row L2 prefetch before griddepcontrol.wait
    t = gemv.DEFAULT
    for m_p in (1, 2):
        out.append((f"dense_gemv pdl M={m_p}", gemv, "_dense_gemv_kernel", dict(
            X=bf, W=bf, B=bf, Y=bf, M=3, N=5120, K=2880, stride_xm=2880, stride_wn=2880,
            stride_ym=5120, R=bf, SC=f32, S_OUT=bf, stride_rm=2880, stride_sm=2880, eps=0.0,
            M_P=c(m_p), BLOCK_N=c(t.block_n), BLOCK_K=c(t.block_k), VEC=c(8), HAS_BIAS=c(True),
            EVEN_K=c(False), DOT=c(False), PREFETCH=c(False), PRECISION=c(None), NORM=c(False),
            HAS_RES=c(False), BLOCK_ROW=c(1), PDL=c(True), SECTORS=c(256)),
            t.num_warps, t.num_stages))
    v, nc = 201088, 99  # 2048-token chunks
    rows = dict(TEMP=f32, TOPK=i64, TOPP=f32, MINP=f32)
    out.append(("sample stats", samp.K, "_stats_kernel", dict(
        L=f32, R=f32, PM=f32, PA=i32, PRM=f32, PRS=f32, PV=f32, PI=i32, HK=i32, CNT=i32, RSF=f32,
        RSI=i32, **rows, SEED=i64, POSN=i64, TOK=i64, LP=f32, sl_b=v, sr_b=v, V=v, NC=nc,
        BLOCK=c(2048), NC_P=c(128)), 8, 1))
    for p, (shift, bits, off) in enumerate(samp.K.PASSES):
        if p:
            out.append((f"sample topk pass {p}", samp.K, "_topk_pass_kernel", dict(
                L=f32, HK=i32, CNT=i32, RSI=i32, **rows, sl_b=v, V=v, NC=nc, SHIFT=c(shift),
                BITS=c(bits), OFF=c(off), SLOT=c(1 + p), BLOCK=c(2048), SUBB=c(512)), 8, 1))
        out.append((f"sample topp pass {p}", samp.K, "_topp_pass_kernel", dict(
            L=f32, HP=f32, CNT=i32, RSF=f32, RSI=i32, **rows, sl_b=v, V=v, NC=nc,
            SHIFT=c(shift), BITS=c(bits), OFF=c(off), SLOT=c(4 + p), BLOCK=c(2048),
            SUBB=c(256 if p == 0 else 512)), 8, 1))
    out.append(("sample draw", samp.K, "_draw_kernel", dict(
        L=f32, R=f32, PV=f32, PI=i32, CNT=i32, RSF=f32, RSI=i32, **rows, SEED=i64, POSN=i64,
        TOK=i64, LP=f32, sl_b=v, sr_b=v, V=v, NC=nc, BLOCK=c(2048), SUBB=c(512), NC_P=c(128)),
        8, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, default=None, help="write each variant's SASS here")
    parser.add_argument("--only", default="", help="substring of the variant labels to build")
    args = parser.parse_args()
    failed = 0
    for label, module, name, kw, warps, stages in variants():
        if args.only not in label:
            continue
        try:
            print(report(build(module, name, kw, warps, stages), label.replace(" ", "_"),
                         args.sass), flush=True)
        except Exception as exc:  # noqa: BLE001 - report every variant
            failed += 1
            print(f"{label:<34} FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
