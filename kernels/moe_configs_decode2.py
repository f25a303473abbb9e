"""Decode tile candidates for 2-32 rows per expert (issue 5: 64 tokens of gpt-oss-20b at ≥ 70 %
of the bandwidth roofline, ≤ 203 µs; DECODE_SA measured 270.8 µs on an H100, triton_kernels'
matmul_ogs 208.9, run 49).

At 8 rows per expert the layer streams every expert's 13 MB once: a pure bandwidth problem,
settled by the bytes each SM keeps in flight. DECODE_SA's programs (16 tokens × 128 weight rows ×
k128, 4 warps) load one k-step at a time (num_stages 1: measured best on 2025-11-25, before the
loads went 16 bytes wide and the exponents a step ahead). These try wider weight tiles (256
rows, 8 warps: one weight tile per warpgroup per step, as matmul_ogs picks on Hopper) and 2-3
pipeline stages, so that ≥ 32 KB per SM are on their way from DRAM while a step's math runs.
Every tile keeps ≥ 4 exponent bytes per thread per k-step (block_n · block_k / 32 ≥ 4 · threads;
kernels/moe_configs.py). Opt-in: merged into candidates() for the sweep; no default changes.
"""

from __future__ import annotations

from kernels.moe_configs import MoEConfig
from kernels.moe_gemm import GemmTiles

_SA = dict(swap_ab=True, wide_loads=True, scale_ahead=True)


def _tiles(n: int, k: int, warps: int, stages: int) -> MoEConfig:
    t = GemmTiles(n, k, num_warps=warps, num_stages=stages, **_SA)
    return MoEConfig(16, t, t, fuse_combine=True)


DECODE2_CANDIDATES: dict[str, MoEConfig] = {
    "d2_n128k128st2": _tiles(128, 128, 4, 2),  # DECODE_SA with a second stage
    "d2_n128k128st3": _tiles(128, 128, 4, 3),
    "d2_n256k128w8st2": _tiles(256, 128, 8, 2),  # matmul_ogs' Hopper weight tile
    "d2_n256k128w8st3": _tiles(256, 128, 8, 3),
    "d2_n256k64st3": _tiles(256, 64, 4, 3),  # 256 rows on one warpgroup, shorter steps
}
