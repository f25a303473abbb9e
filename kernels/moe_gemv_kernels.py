"""The GEMV path's Triton functions (launchers and the math: kernels/moe_gemv.py).

One KernelSet for GEMM 1 (+ swiglu), GEMM 2's partials, the combine, and the helpers they call,
including those of moe_gemv_dequant (fast steps), moe_gemv_pipe (loads ahead, fused combine) and
moe_gemv_split (split-K GEMM 1), which run with this module's globals.
"""

from __future__ import annotations

import triton.language as tl

from kernels import pdl
from kernels.jit import KernelSet
from kernels.moe_dequant import (  # noqa: F401 - the f32 step calls them
    _E2M1_X4_ASM,
    _e2m1_x4,
    _e2m1_x4_emulated,
    _fp4_f32,
)
from kernels.moe_gemv_dequant import (  # noqa: F401 - the kernels call them
    _GROUP_F16_ASM,
    F16,
    F32,
    HELPERS,
    _gemv_step_f16,
    _gemv_step_f32,
    _half_f16,
    _load_f16,
    _load_f32,
    _load_scales,
    _math_f16,
    _math_f32,
    _nib_f16,
    _split4,
    _word_f16_emulated,
)
from kernels.moe_gemv_fence import (  # noqa: F401 - the kernels call them
    _ZERO_AND_ASM,
    FENCE_HELPERS,
    PF_FENCE,
    _fence_f16,
    _gemv_rows_fenced,
    _gemv_step_f16_fenced,
    _xor,
)
from kernels.moe_gemv_pipe import (  # noqa: F401 - the kernels call them
    PF_ASYNC,
    PIPE_HELPERS,
    _combine_block,
    _gemv2_fused_kernel,
    _gemv_rows_pf,
    _load,
    _math,
)
from kernels.moe_gemv_split import _gemv1_part_kernel, _swiglu_sum_kernel
from kernels.pdl import prefetch_rows, wait_then_release

jit = KernelSet(globals())
for _helper in HELPERS + PIPE_HELPERS + FENCE_HELPERS:
    jit(_helper)
pdl.register(jit)
for _kernel in (_gemv2_fused_kernel, _gemv1_part_kernel, _swiglu_sum_kernel):
    jit(do_not_specialize=("stride_ps", "n_pairs"))(_kernel)

GEMV_MAX_SCALE = 240


@jit
def _x_pairs(X, x_row, g, NG: tl.constexpr, MASK: tl.constexpr, k_dim):
    """x[x_row, 32g + 2i] and x[x_row, 32g + 2i + 1] for the groups g: [NG, 16] each, fp32
    (one contiguous [NG, 32] load, split in registers)."""
    offs = g[:, None] * 32 + tl.arange(0, 32)[None, :]  # [NG, 32]
    if MASK:
        xv = tl.load(X + x_row + offs, mask=offs < k_dim, other=0.0)
    else:
        xv = tl.load(X + x_row + offs)
    xe, xo = tl.split(tl.reshape(xv.to(tl.float32), (NG, 16, 2)))
    return xe, xo


@jit
def _gemv_step(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc,
               BLOCK_K: tl.constexpr, MASK: tl.constexpr):
    """acc[BN, NG] += per-group sums of W[rows, k0:k0+BLOCK_K]·x[k0:k0+BLOCK_K], scaled."""
    NG: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, NG)  # [NG] group index
    byte = g[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NG, 16]
    if MASK:
        gm = g < k_dim // 32
        codes = tl.load(W + w_rows[:, None, None] + byte, mask=gm[None, :, None], other=0)
        sc = tl.load(S + s_rows[:, None] + g[None, :] * stride_sg, mask=gm[None, :], other=0)
    else:
        codes = tl.load(W + w_rows[:, None, None] + byte)  # [BN, NG, 16] u8
        sc = tl.load(S + s_rows[:, None] + g[None, :] * stride_sg)  # [BN, NG] u8
    xe, xo = _x_pairs(X, x_row, g, NG, MASK, k_dim)
    b = codes.to(tl.int16)
    lo = ((b & 8) << 12) | ((b & 7) << 9)  # low nibble: k = 2i
    hi = ((b & 0x80) << 8) | ((b & 0x70) << 5)  # high nibble: k = 2i + 1
    wlo = lo.to(tl.float16, bitcast=True).to(tl.float32)  # fp4 · 2⁻¹⁴
    whi = hi.to(tl.float16, bitcast=True).to(tl.float32)
    part = tl.sum(wlo * xe[None, :, :] + whi * xo[None, :, :], axis=2)  # [BN, NG]
    scale = ((sc.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)  # 2^(s − 113)
    return acc + part * scale


@jit
def _step(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc, BLOCK_K: tl.constexpr,
          MASK: tl.constexpr, DEQ: tl.constexpr, EMULATE: tl.constexpr):
    if DEQ == F16:
        acc = _gemv_step_f16(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc,
                             BLOCK_K, MASK, EMULATE)
    elif DEQ == F32:
        acc = _gemv_step_f32(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc,
                             BLOCK_K, MASK, EMULATE)
    else:
        acc = _gemv_step(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc, BLOCK_K, MASK)
    return acc


@jit
def _gemv_rows(X, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi, k_dim,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
               EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0):
    """Σ over k_lo…k_hi (multiples of 32; k_hi ≤ k_dim) of W[rows, k]·x[k] → [BLOCK_N] fp32.
    Whole steps load without masks (rows are clamped in bounds by the callers). DEQ = 0: the
    exact step on x in its own order; F32/F16: the fast steps on pre-split x (moe_gemv_dequant;
    F16: W as int32 words and x as int64, offsets in those units). PREFETCH > 0: the fast steps'
    loads issued that many steps ahead of their math (kernels/moe_gemv_pipe.py)."""
    if PREFETCH == PF_FENCE:  # GemvTiles.loads_first (kernels/moe_gemv_fence.py)
        y = _gemv_rows_fenced(X, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi, BLOCK_N,
                              BLOCK_K, DEQ, EMULATE)
    elif PREFETCH > 0:
        y = _gemv_rows_pf(X, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi, BLOCK_N,
                          BLOCK_K, DEQ, EMULATE, PREFETCH)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32], dtype=tl.float32)
        k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
        for k0 in range(k_lo, k_full, BLOCK_K):
            acc = _step(X, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc, BLOCK_K,
                        False, DEQ, EMULATE)
        if k_full < k_hi:
            acc = _step(X, x_row, W, w_rows, S, s_rows, stride_sg, k_full, k_hi, acc, BLOCK_K,
                        True, DEQ, EMULATE)
        y = tl.sum(acc, axis=1)
    return y


@jit
def _row_offsets(rows, stride_wn, DEQ: tl.constexpr):
    """Code rows' offsets, multiples of 16 bytes (the launcher checks the row strides), so a
    group's 16 bytes load as one vector: in bytes, or in int32 words for the f16 step."""
    return tl.multiple_of(rows.to(tl.int64) * stride_wn, 4 if DEQ == F16 else 16)


@jit
def _bias_swiglu_store(X, h, B, rows_c, ACT, cols, n_act, alpha, limit, DEQ: tl.constexpr):
    """act[cols] = round_x(swiglu(round_x(h) + B[rows_c])) for h [2C] fp32, the sums of the
    interleaved gate/linear rows rows_c (GEMM 1's tail, split or not). X: only its dtype, the
    matmul's rounding as in the reference. ACT: this pair's row; pre-split for the fast steps."""
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    C: tl.constexpr = h.shape[0] // 2
    h = h.to(X_DTYPE).to(tl.float32) + tl.load(B + rows_c)
    gate, lin = tl.split(tl.reshape(h, (C, 2)))
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    pos = cols
    if DEQ != 0:  # pre-split for GEMM 2's fast step: k = 32g + 2i + h at 32g + 16h + i
        pos = cols // 32 * 32 + cols % 2 * 16 + cols % 32 // 2
    act = act.to(X_DTYPE).to(ACT.dtype.element_ty)  # rounded as the oracle's act
    tl.store(ACT + pos, act, mask=cols < n_act)


@jit(do_not_specialize=("n_pairs",))
def _gemv1_swiglu_kernel(
    X, XS, stride_x, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg, B, stride_be,
    EXPERTS, ACT, stride_a, n2, k_dim, n_pairs, alpha, limit,
    TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
    EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """One (pair, block of BLOCK_N interleaved gate/linear rows) → act[pair, BLOCK_N/2].
    XS is what is read: x itself (DEQ = 0) or its pre-split copy (per 32-group the evens, then
    the odds; fp32 or fp16) for the fast step, which also stores ACT pre-split. X: the dtype.
    PDL: nothing before the wait (the experts come from the predecessor, the router)."""
    wait_then_release(PDL)
    pid = tl.program_id(0)
    pair = pid % n_pairs  # pairs fastest: pairs sharing an expert read its rows from L2
    nb = pid // n_pairs
    e = tl.load(EXPERTS + pair).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, n2 - 1)
    h = _gemv_rows(XS, (pair // TOPK).to(tl.int64) * stride_x, W + e * stride_we,
                   _row_offsets(rows_c, stride_wn, DEQ), S + e * stride_se, rows_c * stride_sn,
                   stride_sg, 0, k_dim, k_dim, BLOCK_N, BLOCK_K, DEQ, EMULATE, PREFETCH)
    cols = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    _bias_swiglu_store(X, h, B + e * stride_be, rows_c, ACT + pair.to(tl.int64) * stride_a, cols,
                       n2 // 2, alpha, limit, DEQ)


@jit
def _gemv2_part(
    A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
    EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
    EMULATE: tl.constexpr, PREFETCH: tl.constexpr,
):
    """This program's (pair, K split, block of BLOCK_N rows) → part[split, pair, rows] (fp32,
    no bias); returns the block's index and rows (GEMM 2 and its fused-combine variant)."""
    pid = tl.program_id(0)
    pair = pid % n_pairs
    split = (pid // n_pairs) % SPLIT_K
    nb = pid // (n_pairs * SPLIT_K)
    e = tl.load(EXPERTS + pair).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, n_rows - 1)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_dim)
    y = _gemv_rows(A, pair.to(tl.int64) * stride_a, W + e * stride_we,
                   _row_offsets(rows_c, stride_wn, DEQ), S + e * stride_se, rows_c * stride_sn,
                   stride_sg, k_lo, k_hi, k_dim, BLOCK_N, BLOCK_K, DEQ, EMULATE, PREFETCH)
    tl.store(PART + split * stride_ps + pair.to(tl.int64) * stride_pp + rows, y, mask=rows < n_rows)
    return nb, rows


@jit(do_not_specialize=("stride_ps", "n_pairs"))
def _gemv2_kernel(
    A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
    EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
    EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0, PDL: tl.constexpr = False,
    SECTORS: tl.constexpr = 0,
):
    """One (pair, K split, block of BLOCK_N rows) → part[split, pair, rows] (fp32, no bias).
    PDL: before the wait, this program's code bytes into L2 while GEMM 1 runs; the experts were
    written by the router, two kernels back, complete once GEMM 1 let this kernel launch."""
    if PDL:
        pid = tl.program_id(0)
        pair = pid % n_pairs
        k_lo = (pid // n_pairs) % SPLIT_K * k_per_split
        k_len = tl.minimum(k_per_split, k_dim - k_lo)
        rows = tl.minimum((pid // (n_pairs * SPLIT_K)) * BLOCK_N + tl.arange(0, BLOCK_N),
                          n_rows - 1)
        e = tl.load(EXPERTS + pair, cache_modifier=".cg").to(tl.int64)
        CODES: tl.constexpr = W.dtype.element_ty.primitive_bitwidth // 4  # per element
        prefetch_rows(W + e * stride_we + rows.to(tl.int64) * stride_wn + k_lo // CODES,
                      k_len // CODES, SECTORS, PDL)
    wait_then_release(PDL)
    _gemv2_part(A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
                EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
                SPLIT_K, BLOCK_N, BLOCK_K, DEQ, EMULATE, PREFETCH)


@jit(do_not_specialize=("stride_ps",))
def _gemv_combine_kernel(
    PART, stride_ps, stride_pp, EXPERTS, WEIGHTS, B, stride_be, OUT, stride_o, n_rows,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[t, cols] = Σ_j w[t, j]·(round(Σ_s part[s, t·k + j, cols]) + b2[e_tj, cols])."""
    wait_then_release(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < n_rows
    out = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pair = t * TOPK + j
        e = tl.load(EXPERTS + pair).to(tl.int64)
        y = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            y += tl.load(PART + s * stride_ps + pair.to(tl.int64) * stride_pp + cols, mask=cm,
                         other=0.0)
        y = y.to(OUT.dtype.element_ty).to(tl.float32)
        y += tl.load(B + e * stride_be + cols, mask=cm, other=0.0)
        out += tl.load(WEIGHTS + pair) * y
    tl.store(OUT + t.to(tl.int64) * stride_o + cols, out.to(OUT.dtype.element_ty), mask=cm)
