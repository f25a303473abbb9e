"""Tile configurations of the MoE kernels, and which one a batch gets.

rows per expert ≈ T·k / E decides the regime:
- decode (≤ 16): BLOCK_M = 16, narrow N blocks so the few hit experts' weights are spread over
  many programs (≈ 4 × 5760 / 2 / 32 = 360 programs for one token of 20b on 132 SMs), each weight
  byte read once;
- prefill: BLOCK_M ≥ 64 tensor-core tiles, grouped so that the programs of one expert and N block
  run together and share its weight tile in L2.
`CANDIDATES` is what bench/moe.py --sweep measures; the defaults are its winners on an H100.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.moe_gemm import GemmTiles


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # rows (token/expert pairs) per tile, shared by both GEMMs
    gemm1: GemmTiles  # block_n counts swiglu outputs (2·block_n rows of W1)
    gemm2: GemmTiles
    fast: bool = True  # fp16 MMA with PTX dequantization where the dtype and weights allow

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MoEConfig.block_m must be a power of two ≥ 16, got {self.block_m}")


DECODE = MoEConfig(16, GemmTiles(32, 128), GemmTiles(32, 128))
PREFILL = MoEConfig(64, GemmTiles(64, 64), GemmTiles(128, 64))

DECODE_CANDIDATES = {
    "d_n32k128": DECODE,
    "d_n16k256": MoEConfig(16, GemmTiles(16, 256), GemmTiles(16, 256)),
    "d_n64k128": MoEConfig(16, GemmTiles(64, 128), GemmTiles(64, 128)),
    "d_n32k256": MoEConfig(16, GemmTiles(32, 256, num_stages=2), GemmTiles(32, 256, num_stages=2)),
    "d_swap64": MoEConfig(16, GemmTiles(64, 128, swap_ab=True), GemmTiles(64, 128, swap_ab=True)),
    "d_swap32": MoEConfig(16, GemmTiles(32, 128, swap_ab=True), GemmTiles(32, 256, swap_ab=True)),
    "d_n32k128w2": MoEConfig(16, GemmTiles(32, 128, num_warps=2),
                             GemmTiles(32, 128, num_warps=2)),
}
PREFILL_CANDIDATES = {
    "p_m64": PREFILL,
    "p_m128": MoEConfig(128, GemmTiles(64, 64, num_warps=8), GemmTiles(128, 64, num_warps=8)),
    "p_m128k128": MoEConfig(128, GemmTiles(64, 128, num_warps=8),
                            GemmTiles(128, 128, num_warps=8)),
    "p_m64n128": MoEConfig(64, GemmTiles(128, 64, num_warps=8), GemmTiles(128, 64, num_warps=4,
                                                                          num_stages=4)),
    "p_swap": MoEConfig(128, GemmTiles(64, 64, swap_ab=True), GemmTiles(128, 64, swap_ab=True,
                                                                         num_warps=8)),
    "p_m32": MoEConfig(32, GemmTiles(64, 64), GemmTiles(64, 128)),
}


def candidates(tokens: int, top_k: int, num_experts: int) -> dict[str, MoEConfig]:
    """The configs worth timing for this batch (both families in between)."""
    rows = tokens * top_k / num_experts
    out: dict[str, MoEConfig] = {}
    if rows <= 32:
        out.update(DECODE_CANDIDATES)
    if rows >= 4:
        out.update(PREFILL_CANDIDATES)
    return out


def choose_config(tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """Decode tiles while the average hit expert has at most a tile's worth of rows."""
    return DECODE if tokens * top_k / num_experts <= 16 else PREFILL
