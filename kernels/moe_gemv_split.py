"""Split-K for GEMM 1 of the GEMV path (kernels/moe_gemv.py): `GemvConfig.split_k1 = S > 1`.

At one token of gpt-oss-20b GEMM 1 is 4 pairs × 180 blocks of 32 rows = 720 programs, each a
serial chain of ~11 k-steps (notes/moe.md "Session of 2026-12-06"), ~5.5 per SM at once. With K
split over S programs per (pair, row block) the chains are ~11/S steps long and the grid is S×
larger, so more programs (bytes) are in flight per SM (wave counts: moe_configs_gemv's
GEMV_SPLIT_CANDIDATES):

    part[s, p, rows] = x[t]·W1[e, rows, K_s]ᵀ                  fp32, no bias (S·pairs·2I)
    act[p] = round_x(swiglu(round_x(Σ_s part[s, p]) + b1[e]))   second launch, s = 0…S−1

The sum runs in that fixed order, then exactly the unsplit kernel's tail (moe_gemv's
_bias_swiglu_store: round to x's dtype, + b1, clamp, swiglu, round, pre-split store):
deterministic. The fp32 summation order differs from the unsplit kernel's (one accumulator per
group slot over all of K), so results match the oracle within tolerance, not the unsplit bits;
S = 1 through these two kernels gives the unsplit bits.

Why a second launch (≈ 1 µs of work, ~100 KB of partials per 20b token) and not the swiglu in
GEMM 2's loads of act: act is what GEMM 2 reads, unchanged, so every GEMM 2 variant (its split,
prefetch, cp.async, fused combine) and every dequant mode keeps working and keeps its bits;
folding the sum into GEMM 2 would change the fast steps' shared loads (moe_gemv_dequant,
moe_gemv_pipe) and recompute each act value in all ~90 N-block programs. Worth it only if the
extra launch shows up in the timeline.

Plain functions, registered in moe_gemv_kernels' KernelSet (they run with its globals).
"""

from __future__ import annotations

import triton.language as tl

SPLIT_K1_MAX = 16  # unrolled sum in the second launch; ~11 k256 steps at 20b


def _gemv1_part_kernel(
    XS, stride_x, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
    EXPERTS, PART, stride_ps, stride_pp, n2, k_dim, n_pairs, k_per_split,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DEQ: tl.constexpr, EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0,
):
    """One (pair, K split, block of BLOCK_N interleaved gate/linear rows) → part[split, pair,
    rows] (fp32, no bias). XS: what the unsplit kernel reads (x, or x pre-split)."""
    pid = tl.program_id(0)
    pair = pid % n_pairs  # pairs fastest, as in the unsplit kernel
    split = (pid // n_pairs) % SPLIT_K
    nb = pid // (n_pairs * SPLIT_K)
    e = tl.load(EXPERTS + pair).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, n2 - 1)
    # Splits past K (S > K/32 groups) get the empty range [K, K), not an inverted one that the
    # step loops would skip only because integer division truncates toward zero.
    k_lo = tl.minimum(split * k_per_split, k_dim)
    k_hi = tl.minimum(k_lo + k_per_split, k_dim)
    y = _gemv_rows(XS, (pair // TOPK).to(tl.int64) * stride_x, W + e * stride_we,  # noqa: F821
                   _row_offsets(rows_c, stride_wn, DEQ), S + e * stride_se,  # noqa: F821
                   rows_c * stride_sn, stride_sg, k_lo, k_hi, k_dim, BLOCK_N, BLOCK_K, DEQ,
                   EMULATE, PREFETCH)
    tl.store(PART + split * stride_ps + pair.to(tl.int64) * stride_pp + rows, y, mask=rows < n2)


def _swiglu_sum_kernel(
    X, PART, stride_ps, stride_pp, EXPERTS, B, stride_be, ACT, stride_a, n2, n_pairs,
    alpha, limit, SPLIT_K: tl.constexpr, BLOCK_C: tl.constexpr, DEQ: tl.constexpr,
):
    """One (pair, block of BLOCK_C act columns): h = Σ_s part[s] over the 2·BLOCK_C gate/linear
    rows in the order s = 0…S−1, then the unsplit kernel's bias + swiglu + store."""
    pid = tl.program_id(0)
    pair = pid % n_pairs
    cb = pid // n_pairs
    e = tl.load(EXPERTS + pair).to(tl.int64)
    rows = cb * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)
    rows_c = tl.minimum(rows, n2 - 1)  # as the unsplit kernel: the masked store drops them
    src = PART + pair.to(tl.int64) * stride_pp + rows_c
    h = tl.load(src)  # split 0 as is (no 0 + h: keeps a −0 the unsplit kernel would keep)
    for s in tl.static_range(1, SPLIT_K):
        h = h + tl.load(src + s * stride_ps)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    _bias_swiglu_store(X, h, B + e * stride_be, rows_c,  # noqa: F821 - moe_gemv_kernels'
                       ACT + pair.to(tl.int64) * stride_a, cols, n2 // 2, alpha, limit, DEQ)
