"""Prefill tile candidates for ≥ 64 rows per expert (issue 5: 4096 tokens of gpt-oss-20b at
≥ 50 % of the H100's bf16 rate; notes/moe.md "Prefill GEMMs at 4096 tokens (helper-10)").

Reading PREFILL_SA's compiled loop (sm_90a): every k-step of both GEMMs moves its activation
tile shared memory → registers (GEMM 1 also bf16 → fp32 → fp16) → shared memory in the weights'
column order, and the wgmma reading that fresh buffer is waited for right after it is issued,
so a program's dequantization and its tensor-core work never overlap. `act_ready` (kernels/
moe_gemm_ready.py) stores the activations in that order up front; the loop then feeds the
cp.async ring straight to the MMA. On top of it, 128-token tiles halve the dequantization per
MMA FLOP (the weight tile is reused by twice the tokens).
Opt-in: merged into kernels/moe_configs.candidates() for the sweep; no default changes.
"""

from __future__ import annotations

from dataclasses import replace

from kernels.moe_configs import PREFILL_SA, MoEConfig
from kernels.moe_gemm import GemmTiles

_READY = dict(swap_ab=True, prefetch=4, wide_loads=True, scale_ahead=True, act_ready=True)


def _ready(block_m: int, t1: GemmTiles, t2: GemmTiles | None = None) -> MoEConfig:
    """A config whose two GEMMs agree on act_ready (GEMM 1 writes what GEMM 2 reads)."""
    return MoEConfig(block_m, t1, t2 or t1)


PREFILL2_CANDIDATES: dict[str, MoEConfig] = {
    # today's PREFILL_SA tiles (64 tokens × 128 weight rows × k64) with the activations ready;
    # capped at 168 registers (GEMM 1 would take 198: 2 programs per SM instead of 3)
    "p2_sa_ready": replace(PREFILL_SA,
                           gemm1=replace(PREFILL_SA.gemm1, act_ready=True, max_regs=168),
                           gemm2=replace(PREFILL_SA.gemm2, act_ready=True, max_regs=168)),
    # 128 tokens × 64 weight rows × k64, 4 warps: one m64n128 wgmma row per step, half the
    # dequantization per FLOP of the 64-token tiles, the same accumulator (64 registers)
    "p2_m128n64": _ready(128, GemmTiles(64, 64, **_READY)),
    # the same at k128: one exponent load and prefetch per twice the MMA work (2 stages,
    # 228 registers: 2 programs per SM)
    "p2_m128n64k128": _ready(128, GemmTiles(64, 128, num_stages=2, **_READY)),
    # 128 tokens × 128 weight rows, 8 warps (two warpgroups sharing the activation tile);
    # 161 registers × 256 threads: 1 program per SM
    "p2_m128n128w8": _ready(128, GemmTiles(128, 64, num_warps=8, **_READY)),
}

