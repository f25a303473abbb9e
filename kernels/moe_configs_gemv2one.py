"""GEMV 2 shapes for one token (issue 5): GEMV_ONE with only its GEMM 2 tiles changed.

At one 20b token GEMV_ONE's GEMM 2 (`_gemv2_fused_kernel`, 4 × 2880 × 2880 MXFP4, the combine
folded in) is 4 pairs × 2 K splits × 90 blocks of 32 rows = 720 programs: the same count and
per-step tile (32 rows × 128 code bytes) as GEMM 1, but a chain of 6 k256 steps (5 whole + one
of 5 groups) instead of 12. Offline sm_90a: 66 registers, 7 programs per SM, so the grid is one
partial wave (5.45 per SM). The section "GEMV 2 at one token" of notes/moe.md has the model these
test. GEMM 1, the router and the fused combine stay GEMV_ONE's; the f16 step keeps its loads
first (offline: 0 late 16-byte loads in every shape below). Bench-only until measured.
Names: g8_n{rows}k{block_k}s{split}, GEMM 2's tiles.
"""

from __future__ import annotations

from dataclasses import replace

from kernels.moe_configs import MoEConfig
from kernels.moe_configs_gemv import GEMV_ONE


def _gemm2(n: int, k: int, split: int) -> MoEConfig:
    """GEMV_ONE with GEMM 2 as BLOCK_N n × BLOCK_K k, K split over `split` programs."""
    assert GEMV_ONE.gemv is not None
    tiles = replace(GEMV_ONE.gemv.gemm2, block_n=n, block_k=k, split_k=split)
    return replace(GEMV_ONE, gemv=replace(GEMV_ONE.gemv, gemm2=tiles))


# Offline sm_90a (bench.moe_compile's report on these GemvTiles), GEMM 2 at 20b shapes: regs /
# programs per SM; programs; steps per program; no spills, loop 179–183 instructions, 0 of 10
# 16-byte loads after the first math (today's: 66 / 7; 720; 5 + 5/8).
GEMV2ONE_CANDIDATES: dict[str, MoEConfig] = {
    # 64 / 8; 720 programs of 16 rows × 256 B, 5 + 5/8 steps: today's chain and grid with twice
    # the contiguous bytes per row and step, one partial per pair (half the partials, 4 arrivals
    # per block counter instead of 8)
    "g8_n16k512s1": _gemm2(16, 512, 1),
    # 68 / 7; 1440 programs of 16 rows × 256 B, 2 + 13/16 steps: two rounds per SM (7 + ~4)
    "g8_n16k512s2": _gemm2(16, 512, 2),
    # 72 / 7; 1440 programs of today's tile, 2 + 7/8 steps (the last split 2 + 5/8)
    "g8_n32k256s4": _gemm2(32, 256, 4),
}
