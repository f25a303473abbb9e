"""Latency-hiding tile candidates of the MoE GEMMs (notes/moe.md "Prefetch / latency").

The tile GEMMs at 64–512 tokens were latency bound on the H100 (ncu: DRAM 20–33 %, 0.23–0.27
warps issued per scheduler per cycle, ~75 % of cycles with no eligible warp): each k-step issued
its loads and then waited a DRAM round trip. These keep weight bytes in flight during the math:
`prefetch=d` asks L2 for step i + d's codes and exponents at step i (no register cost), and
`wide_loads` loads the codes 16 bytes at a time (4 instead of 16 loads per thread and step), which
also lets Triton's own pipeline (num_stages ≥ 2) use 16-byte cp.async. Opt-in: the lead wires
LATENCY_CANDIDATES into kernels/moe_configs.candidates() for a GPU sweep; no default changes.
"""

from __future__ import annotations

from dataclasses import replace

from kernels.moe_configs import DECODE, PREFILL, MoEConfig
from kernels.moe_gemm import GemmTiles


def _both(mc: MoEConfig, **changes: object) -> MoEConfig:
    """mc with the same tile changes in both GEMMs."""
    return replace(mc, gemm1=replace(mc.gemm1, **changes), gemm2=replace(mc.gemm2, **changes))


LATENCY_CANDIDATES: dict[str, MoEConfig] = {
    # DECODE (16 tokens × 128 rows × k128, 1 stage) + L2 prefetch 2 steps ahead, 16-byte loads
    "d_pf2w": _both(DECODE, prefetch=2, wide_loads=True),
    # the same, 4 steps (32 KB per program) ahead
    "d_pf4w": _both(DECODE, prefetch=4, wide_loads=True),
    # L2 prefetch 2 ahead + Triton's 2-stage cp.async pipeline (hides the L2 hit of each step)
    "d_pf2wst2": _both(DECODE, prefetch=2, wide_loads=True, num_stages=2),
    # 16-byte loads alone (isolates wide_loads from the prefetch)
    "d_w": _both(DECODE, wide_loads=True),
    # PREFILL (64 tokens × 128 rows × k64, 3 stages) + L2 prefetch 4 steps (= 2 × k128) ahead
    "p_pf4w": _both(PREFILL, prefetch=4, wide_loads=True),
    # the same with 2 stages (fewer registers, more CTAs per SM)
    "p_pf4wst2": _both(PREFILL, prefetch=4, wide_loads=True, num_stages=2),
    # PREFILL tiles at k128 (4 exponent bytes per thread and step: cp.async, where k64's 2 bytes
    # are a synchronous load every step) + prefetch 2 ahead, 2 stages
    "p_k128pf2": _both(PREFILL, block_k=128, prefetch=2, wide_loads=True, num_stages=2),
}

# Tiles at 64–512 tokens (helper-12; notes/moe.md "Tiles at 64–512 tokens"): scale_ahead loads
# each k-step's exponents one step early, before the codes (the compiled loop had issued them
# after the codes' shuffle: two serialized round trips per step, now one).
_AHEAD = dict(wide_loads=True, scale_ahead=True)
_T128 = GemmTiles(128, 128, swap_ab=True, num_stages=1, **_AHEAD)
LATENCY_CANDIDATES.update({
    # DECODE_WIDE (today's ≤ 16 rows/expert default) + exponents ahead: 123/127 regs, 4 CTAs/SM
    "m_w_sa": _both(DECODE, **_AHEAD),
    # + L2 prefetch 2 steps ahead: the codes' own round trip becomes an L2 hit (3 CTAs/SM)
    "m_pf2w_sa": _both(DECODE, prefetch=2, **_AHEAD),
    # 32-token tiles for 16–64 rows per expert (128–512 tokens of 20b): half the weight re-reads
    # of the 16-row tiles, half the dead MMA columns of the 64-row ones (3 CTAs/SM)
    "m_m32_sa": MoEConfig(32, _T128, _T128, fuse_combine=True),
    # PREFILL_PF (today's > 16 rows/expert default) + exponents ahead: k64's 2-byte exponent
    # load (no cp.async below 4 bytes) was waited on in its own step
    "m_p_pf4w_sa": _both(PREFILL, prefetch=4, **_AHEAD),
    # 128-token tiles for ≥ 4096 tokens (p_mix + prefetch + wide + ahead): half the
    # dequantization per MMA FLOP of the 64-token tiles; 1 CTA of 8 warps per SM
    "m_mix_pf4w_sa": MoEConfig(128, GemmTiles(256, 64, swap_ab=True, num_warps=8, prefetch=4,
                                              **_AHEAD),
                               GemmTiles(128, 128, swap_ab=True, num_warps=8, prefetch=2,
                                         **_AHEAD)),
})
