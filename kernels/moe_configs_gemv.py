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
