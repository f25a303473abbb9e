"""GEMV latency candidates (issue 5: one 20b token ≤ 25 µs per layer): the GEMV_FAST family
with the loads issued ahead of the math and the combine folded into GEMM 2
(kernels/moe_gemv_pipe.py). Bench-only until measured; the defaults stay in moe_configs.py.
Names: g2_n{rows}k{block_k}{dequant}p{prefetch steps}[c: fused combine]; all with the fused
router, as GEMV_FAST.
"""

from __future__ import annotations

from dataclasses import replace

from kernels.moe_configs import GEMV_FAST, MoEConfig
from kernels.moe_gemv import GemvConfig, GemvTiles


def _gemv_pf(n: int, k: int, split: int, dequant: str, prefetch: int, fuse: bool,
             async_copy: bool = False, warps: int = 4, stages: int = 3) -> MoEConfig:
    """GEMV_FAST's launch sequence with these GEMV tiles (both GEMMs alike, GEMM 2 split K)."""
    opts = dict(num_warps=warps, num_stages=stages, dequant=dequant, prefetch=prefetch,
                async_copy=async_copy)
    return replace(GEMV_FAST, gemv=GemvConfig(
        GemvTiles(n, k, **opts), GemvTiles(n, k, split_k=split, **opts), fuse_combine=fuse))


GEMV2_CANDIDATES: dict[str, MoEConfig] = {
    # today's default with the combine folded in: what one launch less is worth
    "g2_n32k256f32p0c": _gemv_pf(32, 256, 2, "f32", 0, True),
    # + codes and x through cp.async, 3 buffers deep (same bits as the default)
    "g2_n32k256f32ac": _gemv_pf(32, 256, 2, "f32", 0, True, async_copy=True),
    # the fp16 step (5.3 instr/B) once its loads no longer wait in series with its math
    "g2_n32k256f16ac": _gemv_pf(32, 256, 2, "f16", 0, True, async_copy=True),
    "g2_n64k256f16ac": _gemv_pf(64, 256, 2, "f16", 0, True, async_copy=True),
    # two register buffers instead (ptxas issues the look-ahead loads mid-math: partial overlap)
    "g2_n32k256f16p1c": _gemv_pf(32, 256, 2, "f16", 1, True),
}


def _fast(n: int, k: int, warps: int = 4) -> MoEConfig:
    """GEMV_FAST (f32 step, fused router, GEMM 2 split in 2) with other program shapes."""
    return _gemv_pf(n, k, 2, "f32", 0, False, warps=warps)


# Program shapes (issue 5, one 20b token). The graph timeline (notes/gpu-runs.md run 44) has
# GEMV 1 at 20.75 µs for 35 MB (57 % of the copy roofline): 720 programs of 32 rows, each a
# serial chain of ~11 k-steps of 4 KB (load, wait a round trip, math). At 61 registers (offline)
# they are one partial wave (see the split candidates below), so the chain and the bytes in
# flight per step are what these trade: rows, steps and warps per program.
GEMV_WAVE_CANDIDATES: dict[str, MoEConfig] = {
    "g3_n16k256": _fast(16, 256),  # 1440 programs, half the registers of the x/codes tiles
    "g3_n16k512": _fast(16, 512),  # half the steps, the same bytes per step as today
    "g3_n32k512": _fast(32, 512),  # half the steps, twice the bytes in flight per program
    "g3_n32k256w2": _fast(32, 256, warps=2),  # today's tile on 2 warps: 2× programs per SM
    "g3_n8k512w2": _fast(8, 512, warps=2),  # 2880 small programs
}


def _split(n: int, k: int, split_k1: int) -> MoEConfig:
    """_fast's shapes with GEMM 1's K split over split_k1 programs (kernels/moe_gemv_split.py)."""
    mc = _fast(n, k)
    return replace(mc, gemv=replace(mc.gemv, split_k1=split_k1))


# Split-K for GEMM 1 (issue 5, one 20b token; GEMV 1 20.75 µs, roofline ≈ 11.8). Offline sm_90a
# (bench.moe_compile helpers): today's n32k256 f32 program has 61 registers, so 8 fit an SM
# (1056 at once) and its 720 programs are ONE partial wave (the 4-per-SM figure, 119 registers,
# is ncu run 16's, when GEMV 1 was the exact-step n16k512). What splitting changes is then the
# serial chain (11.25 k-steps) and how many programs are in flight (5.5 per SM today, up to 8):
# wave counts below at the split kernel's registers (61; n64: 78 → 6/SM; k512: 120 → 4/SM).
# The sum + swiglu launch (~100 KB of partials) costs ≈ 1.5–2.5 µs back. GEMM 2 as GEMV_FAST's.
GEMV_SPLIT_CANDIDATES: dict[str, MoEConfig] = {
    # 1440 programs × 6 steps (5 whole + 5 groups): 1.36 waves, the control: ≈ today if the
    # second wave's 6-step chain is what it costs
    "g4_n32k256s2": _split(32, 256, 2),
    # 2880 × 3 (2 whole + 7 groups; the last split 5): 2.73 waves of 3 steps at 8 per SM
    "g4_n32k256s4": _split(32, 256, 4),
    # 720 × 6 steps of 8 KB: one wave (792 slots), today's programs with half the chain
    "g4_n64k256s2": _split(64, 256, 2),
    # 1440 × 3 steps of 8 KB (2 whole + 13 groups) at 4 per SM: 2.73 waves
    "g4_n32k512s2": _split(32, 512, 2),
}


def _words(n: int, k: int, dequant: str, warps: int = 4) -> MoEConfig:
    """GEMV_FAST's launches (fused router, GEMM 2 split 2) with the exponents read as words."""
    opts = dict(num_warps=warps, dequant=dequant, scale_words=True)
    return replace(GEMV_FAST, gemv=GemvConfig(GemvTiles(n, k, **opts),
                                              GemvTiles(n, k, split_k=2, **opts)))


# Scale words (kernels/moe_gemv_scales.py; notes/moe.md "GEMV scale words"): each row's exponents
# of 4 groups as one int32, issued before the step's codes in the PTX. Same bits as the byte
# layout. Offline, ptxas still sinks the f16 step's word loads (and 6 of its 10 16-byte loads)
# below the first math: these measure whether the layout alone moves anything. Needs
# prepare_moe(..., scale_words=True) (bench.moe --sweep prepares them).
GEMV_SCALEWORD_CANDIDATES: dict[str, MoEConfig] = {
    "g5_n32k256f32w": _words(32, 256, "f32"),  # today's default + words
    "g5_n32k256f16w": _words(32, 256, "f16"),  # the f16 step + words
    "g5_n16k512f32w": _words(16, 512, "f32"),
    "g5_n16k512f16w": _words(16, 512, "f16"),
}


def _first(n: int, k: int, fuse: bool = False, words: bool = False) -> MoEConfig:
    """GEMV_FAST's launches (fused router, GEMM 2 split 2) with the f16 step's loads all issued
    before its first math (GemvTiles.loads_first, kernels/moe_gemv_fence.py)."""
    opts = dict(dequant="f16", loads_first=True, scale_words=words)
    return replace(GEMV_FAST, gemv=GemvConfig(GemvTiles(n, k, **opts),
                                              GemvTiles(n, k, split_k=2, **opts),
                                              fuse_combine=fuse))


# The f16 step waiting once per step (notes/moe.md "GEMV loads first"): same bits as "f16".
# Needs prepare_moe(..., scale_words=True) for the "w" one (bench.moe --sweep prepares them).
GEMV_LOADSFIRST_CANDIDATES: dict[str, MoEConfig] = {
    "g6_n32k256f16b": _first(32, 256),  # g_n32k256f16fr with the loads first
    "g6_n32k256f16bw": _first(32, 256, words=True),  # + scale words
    "g6_n32k256f16bc": _first(32, 256, fuse=True),  # + the combine folded into GEMM 2
}
# The GEMV defaults (choose_config; bench/results/moe.jsonl). One token: g6_n32k256f16bc, 36.5 µs
# per 20b layer against 39.4 for GEMV_FAST on an H100 (run 49, 427ea7b); 34.1 vs 38.1 on an H200
# (run 50). More tokens up to the GEMV's limit: g6_n32k256f16b (the folded combine loses there:
# one program sums every pair), 8 tokens 161.9 vs 180.4 µs (20b) and 176.4 vs 192.0 (120b) on
# the H200 (run 50).
GEMV_ONE = GEMV_LOADSFIRST_CANDIDATES["g6_n32k256f16bc"]
GEMV_SMALL = GEMV_LOADSFIRST_CANDIDATES["g6_n32k256f16b"]


# The fused router's one-token plan from registers (MoEConfig.router_fast_one,
# kernels/moe_router_one.py): no logits round trip, histogram, ranking or tile scans after the
# router GEMV in its last program. Same plans, bit for bit; notes/moe.md "Router one-token path".
GEMV_ROUTERONE_CANDIDATES: dict[str, MoEConfig] = {
    "g7_n32k256f32fr1": replace(GEMV_FAST, router_fast_one=True),  # today's default + the flag
}
