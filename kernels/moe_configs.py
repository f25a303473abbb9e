"""Tile configurations of the MoE kernels, and which one a batch gets.

rows per expert ≈ T·k / E decides the regime:
- decode (≤ 16): BLOCK_M = 16 and the weights on the MMA's M side (swap AB: wgmma with the
  dequantized weights straight from registers), 64 weight rows per program so the few hit
  experts are spread over many programs (4 × 5760 / 64 = 360 for one token of 20b on 132 SMs),
  each weight byte read once; GEMM 2 (2880 rows per expert) splits K when ≤ 8 experts are hit;
- prefill: BLOCK_M ≥ 64 tensor-core tiles, grouped so that the programs of one expert and N block
  run together and share its weight tile in L2.
`CANDIDATES` is what bench/moe.py --sweep measures; the defaults are its winners on an H100.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kernels.moe_gemm import GemmTiles
from kernels.moe_gemv import GemvConfig, GemvTiles


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # rows (token/expert pairs) per tile, shared by both GEMMs
    gemm1: GemmTiles  # block_n counts swiglu outputs (2·block_n rows of W1)
    gemm2: GemmTiles
    fast: bool = True  # fp16 MMA with PTX dequantization where the dtype and weights allow
    fuse_combine: bool = False  # GEMM 2's last program per N block sums the tokens' rows
    pdl: bool = False  # programmatic dependent launch between the Triton kernels (sm_90+)
    fused_router: bool = False  # router GEMV + routing in one launch (kernels/moe_router.py)
    # with fused_router, one token's plan written from the last program's registers (same bits;
    # kernels/moe_router_one.py); off until timed on the H100
    router_fast_one: bool = False
    # Small batches: per-(token, expert) GEMVs (kernels/moe_gemv.py) instead of the tile GEMMs
    # (which stay the fallback where the weights' scales are out of the GEMV's exact range).
    gemv: GemvConfig | None = None
    # Routing kernels (same plan, bit for bit): "par" kernels/moe_routing_par.py (many small
    # token blocks, two short launches), "seq" kernels/moe_routing.py (the one before: up to
    # 256 tokens per program, ranked in serial steps). notes/moe.md "Router, routing, combine".
    routing: str = "par"
    # fuse_combine only up to this many tokens (None: at any size). Above it the combine is its
    # own launch (same bits): the fused one runs in the last program of each N block, ⌈T/16⌉
    # serial steps at the very end of GEMM 2 (notes/moe.md "Router, routing, combine").
    fused_combine_max_tokens: int | None = 64

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MoEConfig.block_m must be a power of two ≥ 16, got {self.block_m}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoEConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.fused_combine_max_tokens is not None and self.fused_combine_max_tokens < 0:
            raise ValueError("MoEConfig.fused_combine_max_tokens must be ≥ 0 or None")

    def fuses_combine(self, tokens: int) -> bool:
        """Whether GEMM 2 sums the tokens' rows itself at this batch size."""
        limit = self.fused_combine_max_tokens
        return self.fuse_combine and (limit is None or tokens <= limit)


ROUTINGS = ("par", "seq")


def previous_routing(mc: MoEConfig) -> MoEConfig:
    """mc with the routing and combine placement of before the "par" kernels (A/B runs)."""
    return replace(mc, routing="seq", fused_combine_max_tokens=None)


# Every tile moves ≥ 4 exponent bytes per thread per k-step (block_n · block_k/32 ≥ 4 · threads),
# so the exponents go through cp.async with the codes: byte-wide loads cannot, and a plain load
# stalled every k-step on a DRAM round trip (first H100 run: ~110 µs for one token, any tile).
# One pipeline stage measured fastest on the H100 (2026-11-25: 449 vs 482 µs at 64 tokens of 20b,
# 1299 vs 1629 µs at 64 tokens of 120b; bench/results/moe.jsonl).
DECODE = MoEConfig(16, GemmTiles(128, 128, swap_ab=True, num_stages=1),
                   GemmTiles(128, 128, swap_ab=True, num_stages=1), fuse_combine=True)
# One or two tokens hit ≤ 8 experts: 64-row programs (k-steps of 256 for the exponent rule),
# and GEMM 2 (2880 rows per expert) splits K, so ≥ 360 programs share the 132 SMs evenly.
DECODE_FEW = MoEConfig(16, GemmTiles(64, 256, swap_ab=True),
                       GemmTiles(64, 256, swap_ab=True, split_k=2), fuse_combine=True)
# Few (token, expert) pairs: one short GEMV program per (pair, 32 weight rows), 1440 + 720
# programs for one token of 20b (vs 360 long ones): see notes/moe.md "GEMV path".
GEMV = replace(DECODE_FEW, gemv=GemvConfig(GemvTiles(32, 256), GemvTiles(32, 256, split_k=2)))
# Measured on the H100 (2026-11-25, bench/results/moe.jsonl): ≤ 8 pairs, 16-row k512 programs
# (62 µs vs 67 for one token of 20b); up to 32 pairs, 32-row k128 programs without a K split
# (296 µs vs 303 for the tile path at 8 tokens of 20b, 302 vs 418 for 120b).
GEMV_FEW = replace(GEMV, gemv=GemvConfig(GemvTiles(16, 512), GemvTiles(16, 512, split_k=2)))
GEMV_MANY = replace(GEMV, gemv=GemvConfig(GemvTiles(32, 128), GemvTiles(32, 128)))
# Up to 64 pairs the GEMV beat the tile path in the 2026-11-25 H100 sweep (16 tokens of 20b:
# 319-339 µs vs 416; of 120b: 373 vs 660).
GEMV_MAX_PAIRS = 64
# 32-row tiles: the fp32-activation fallback (they fit shared memory with fp32 x).
TILES_32 = MoEConfig(32, GemmTiles(128, 128, swap_ab=True), GemmTiles(128, 128, swap_ab=True))
# 128 tokens × 128 weight rows × k256, 8 warps: ≈ 12 (GEMM 1) / 9.4 (GEMM 2) instructions per
# weight byte at 128 rows per tile, no spills, 145 KB of shared memory in 2 stages — but measured
# slower on the H100 than the 64-row tiles below (6.77 vs 3.95 ms at 4096 tokens of 20b).
K256 = MoEConfig(128, GemmTiles(128, 256, swap_ab=True, num_warps=8, num_stages=2),
                 GemmTiles(128, 256, swap_ab=True, num_warps=8, num_stages=2))
# More than 16 rows per expert: 64-token × 128-row × k64 tiles were the H100 sweep's best at 256
# and 4096 tokens for both shapes (2026-11-25, bench/results/moe.jsonl: 20b 657 µs vs 800 for the
# 32-row tiles at 256 tokens; 3.95 ms vs 6.77 at 4096; 120b 4.76 ms vs 9.48 at 4096).
PREFILL = MoEConfig(64, GemmTiles(128, 64, swap_ab=True), GemmTiles(128, 64, swap_ab=True))


def _both(mc: MoEConfig, **changes: object) -> MoEConfig:
    """mc with the same tile changes in both GEMMs."""
    return replace(mc, gemm1=replace(mc.gemm1, **changes), gemm2=replace(mc.gemm2, **changes))


# The defaults since the H100 sweep of 2026-11-25 (bench/results/moe.jsonl, commit 3bb1fdc):
# the tile loops were latency bound (kernels/moe_configs_latency.py); 16-byte code loads alone
# ("d_w") took 64 tokens of 20b from 454 to 296 µs, 128 from 604 to 384, 256 tokens of 120b
# from 1511 to 1031; the L2 prefetch 4 steps ahead ("p_pf4w") took 256 tokens of 20b from 659
# to 538 µs, 512 from 939 to 733, 4096 from 4056 to 2887 (and 120b: 4869 to 3561).
# Both need 16-byte aligned code rows (prepare_moe checks; moe_forward drops them otherwise).
DECODE_WIDE = _both(DECODE, wide_loads=True)
PREFILL_PF = _both(PREFILL, prefetch=4, wide_loads=True)
MIDDLE = PREFILL_PF

# The defaults since the H100 sweep of 2026-11-25 (session 3, commit 0e4f817; bench/results/
# moe.jsonl): the same tiles with each k-step's exponents loaded one step ahead (`scale_ahead`,
# kernels/moe_configs_latency.py's m_* entries, which these equal), and a 32-row middle tile.
# µs per layer before → after: 20b 64 tokens 296 → 274, 128: 386 → 313, 256: 544 → 440,
# 1024: 997 → 966, 4096: 2898 → 2797; 120b 64: 880 → 819, 256: 1033 → 958, 1024: 1809 → 1539.
# At 16 tokens of 20b (2 rows per expert) the decode tiles now beat the GEMVs (249 vs 318+).
_AHEAD = dict(wide_loads=True, scale_ahead=True)
_T128_SA = GemmTiles(128, 128, swap_ab=True, num_stages=1, **_AHEAD)
DECODE_SA = _both(DECODE, **_AHEAD)  # ≤ 8 rows per expert
MIDDLE_SA = MoEConfig(32, _T128_SA, _T128_SA, fuse_combine=True)  # 8 < rows ≤ 64
PREFILL_SA = _both(PREFILL, prefetch=4, **_AHEAD)  # > 64 rows per expert

# What bench/moe.py --sweep times (each checked against the oracle first). Kept small: every
# entry is two or three kernel compiles on the GPU machine, whose time is scarce.
# (Riskier launch features last: a sticky CUDA error would end the sweep, not its first half.)
def _gemv(n: int, k: int, split: int, dequant: str, warps: int = 4) -> MoEConfig:
    return replace(GEMV, gemv=GemvConfig(
        GemvTiles(n, k, num_warps=warps, dequant=dequant),
        GemvTiles(n, k, num_warps=warps, split_k=split, dequant=dequant)))


# The GEMV default from the H100 sweep of 2026-11-25 (bench/results/moe.jsonl): the fast "f32"
# step (exact products, fp32 sums) led or tied at 1-16 tokens of both shapes (one 20b token:
# 48 µs vs 61 for the exact step; "f16" was no faster, the GEMV no longer being issue bound),
# and the H-split fused router saved another ≈5 µs (48 vs 53 µs with the f16 step).
GEMV_FAST = replace(_gemv(32, 256, 2, "f32"), fused_router=True)

GEMV_CANDIDATES = {
    "g_n16k512": GEMV_FEW,  # the defaults until the fast step is measured
    "g_n32k128nos": GEMV_MANY,
    # The fast step (kernels/moe_gemv_dequant.py): whole-word dequantization, pre-split x,
    # fp32 FFMA ("f32") or fp16 HFMA2 ("f16") math; see notes/moe.md "GEMV path".
    "g_n32k256f16": _gemv(32, 256, 2, "f16"),
    "g_n64k256f16": _gemv(64, 256, 2, "f16"),
    "g_n16k512f16": _gemv(16, 512, 2, "f16"),
    "g_n32k128nosf16": _gemv(32, 128, 1, "f16"),
    "g_n128k128nosf16": _gemv(128, 128, 1, "f16"),
    "g_n32k256f32": _gemv(32, 256, 2, "f32"),
    "g_n128k128nosf32": _gemv(128, 128, 1, "f32"),
    # the router GEMV and routing in one launch (kernels/moe_router.py, split along H)
    "g_n32k256f16fr": replace(_gemv(32, 256, 2, "f16"), fused_router=True),
    "g_n32k256f32fr": GEMV_FAST,
}
# (Losers of the 2026-11-25 H100 sweeps, dropped to save GPU time; their figures are in
# bench/results/moe.jsonl: k256/k512 stage variants, split-K 4, 8-warp GEMV, PDL, exact.)
DECODE_CANDIDATES = {
    "d_swap128st1": DECODE,
    "d_swap64k256": DECODE_FEW,
    "d_swap128fr": replace(DECODE, fused_router=True),
}
PREFILL_CANDIDATES = {
    "p_swap64": PREFILL,
    "p_m64k128": MoEConfig(64, GemmTiles(128, 128, swap_ab=True), GemmTiles(128, 128, swap_ab=True)),
    "p_mix": MoEConfig(128, GemmTiles(256, 64, swap_ab=True, num_warps=8),
                       GemmTiles(128, 128, swap_ab=True, num_warps=8)),
}


def candidates(tokens: int, top_k: int, num_experts: int) -> dict[str, MoEConfig]:
    """The configs worth timing for this batch (both families in between)."""
    rows = tokens * top_k / num_experts
    out: dict[str, MoEConfig] = {}
    if tokens * top_k <= 2 * GEMV_MAX_PAIRS:  # measured a little past the default cut-over
        from kernels.moe_configs_gemv import (  # loads ahead, fused combine; wave shapes
            GEMV2_CANDIDATES,
            GEMV_LOADSFIRST_CANDIDATES,
            GEMV_ROUTERONE_CANDIDATES,
            GEMV_SCALEWORD_CANDIDATES,
            GEMV_SPLIT_CANDIDATES,
            GEMV_WAVE_CANDIDATES,
        )
        from kernels.moe_configs_gemv2one import GEMV2ONE_CANDIDATES  # GEMM 2 shapes only

        out.update(GEMV_CANDIDATES)
        out.update(GEMV2ONE_CANDIDATES)
        out.update(GEMV2_CANDIDATES)
        out.update(GEMV_WAVE_CANDIDATES)
        out.update(GEMV_SPLIT_CANDIDATES)
        out.update(GEMV_SCALEWORD_CANDIDATES)
        out.update(GEMV_LOADSFIRST_CANDIDATES)
        out.update(GEMV_ROUTERONE_CANDIDATES)
    if rows <= 32:
        from kernels.moe_configs_decode2 import DECODE2_CANDIDATES  # wider tiles, stages

        out.update(DECODE_CANDIDATES)
        out.update(DECODE2_CANDIDATES)
    if rows >= 4:
        out.update(PREFILL_CANDIDATES)
    if rows >= 64:  # prefill tiles, activations in MMA order (kernels/moe_configs_prefill.py)
        from kernels.moe_configs_prefill import PREFILL2_CANDIDATES

        out.update(PREFILL2_CANDIDATES)
    if rows > 1:  # the latency-hiding tiles (kernels/moe_configs_latency.py)
        from kernels.moe_configs_latency import LATENCY_CANDIDATES

        out.update(LATENCY_CANDIDATES)
    # plain launches first, then the fused router and programmatic dependent launch
    return dict(sorted(out.items(), key=lambda kv: kv[1].pdl or kv[1].fused_router))


def choose_config(tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """By the average rows per expert (H100 sweep of 2026-11-25, commit 0e4f817; runs 49/50 of
    2026-12-07): GEMVs up to one row per expert (and GEMV_MAX_PAIRS pairs), then tiles with the
    exponents loaded a step ahead: 16-row decode tiles up to 8 rows, 32-row tiles up to 64,
    64-row prefill tiles above, with the activations stored in MMA order first from 256 rows
    (4096 tokens of 20b: 2640 vs 2715 µs on an H100, 2336 vs 2569 on an H200; at 1024 tokens,
    128 rows, the two tie). Up to 8 rows with ≤ 32 experts (20b): 256-row, 3-stage decode tiles
    (run 53, H100: 20b 64 tokens 255.9 vs DECODE_SA's 272.4 µs, 16 tokens 234.8 and faster than
    DECODE_SA; at 120b, 64 tokens, DECODE_SA stayed ahead)."""
    rows = tokens * top_k / num_experts
    pairs = tokens * top_k
    if pairs <= GEMV_MAX_PAIRS and rows <= 1:  # the f16 step with its loads first
        from kernels.moe_configs_gemv import GEMV_ONE, GEMV_SMALL

        return GEMV_ONE if tokens == 1 else GEMV_SMALL  # one token: the combine in GEMM 2
    if rows <= 8:
        if num_experts <= 32:  # 256 weight rows per program, 3 stages (kernels/moe_configs_decode2)
            from kernels.moe_configs_decode2 import DECODE2_CANDIDATES

            return DECODE2_CANDIDATES["d2_n256k64st3"]
        return DECODE_SA
    if rows <= 64:
        return MIDDLE_SA
    if rows < 256:
        return PREFILL_SA
    from kernels.moe_configs_prefill import PREFILL2_CANDIDATES  # (it imports this module)

    return PREFILL2_CANDIDATES["p2_sa_ready"]
