"""Grouped GEMMs of the MoE on MXFP4 expert weights, dequantized in the kernel.

Rows are the token/expert pairs in expert order (kernels/moe_routing.py), in tiles of BLOCK_M
rows of one expert e. With W[e] MXFP4 (value = fp4(code) · 2^(scale − 127), runtime/mxfp4.py):
    GEMM 1:  h = x[token(row)]·W1[e]ᵀ + b1[e]            gate = h[0::2], linear = h[1::2]
             act[row] = swiglu(gate, linear)             g·σ(α·g)·(clamp(l, ±L) + 1), g = min(g, L)
    GEMM 2:  y[row] = (act[row]·W2[e]ᵀ + b2[e]) · w_router(row)
Each matmul is rounded to the activation dtype before the fp32 bias (as torch's matmul is in
kernels/moe_ref.py); accumulation is fp32.

Weights are read in the checkpoint's own layout: output row n's K/2 code bytes are contiguous
([E, N, K/2] u8) and its K/32 scale bytes too. A program owns BLOCK_N consecutive weight rows; for
GEMM 1 those are interleaved gate/linear rows, split into (gate, linear) pairs after the dot, so
swiglu fuses without any repacking. Dequantization (exact and fast paths): kernels/moe_dequant.py.

SWAP_AB computes the transposed product (W as the left operand): with few rows per expert (decode)
the weights fill the MMA's M side (wgmma, straight from registers) and the tokens its N side.
SPLIT_K (GEMM 2) splits K over programs into fp32 partials; FUSE_COMBINE lets the last program of
each N block (an arrival counter) sum every token's rows, instead of a separate combine launch.
Grid: one program per (tile, N block[, split]), tiles of one N block grouped GROUP_M at a time so
programs running together share the expert's weights in L2. Tiles past the routing's last are
idle (expert −1): the grid has a fixed size and the launch can be captured in a CUDA graph.
MoE grouped GEMM (MegaBlocks): https://arxiv.org/abs/2211.15841; OCP MX formats v1.0.
"""

from __future__ import annotations

import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.jit import KernelSet
from kernels.moe_dequant import (  # noqa: F401 - the kernels call them
    _E2M1_X4_ASM,
    _L2_ASM,
    _L2_LINE_ASM,
    HELPERS,
    _a_tile,
    _a_tile_fast,
    _e2m1_x4,
    _e2m1_x4_emulated,
    _fp4_f32,
    _l2_prefetch,
    _scaled_fast,
    _w_tile,
    _w_tile_fast,
)
from kernels.moe_gemm_ahead import HELPERS as AHEAD_HELPERS
from kernels.moe_gemm_ahead import _scales, _w_tile_fast_sc  # noqa: F401 - the kernels call them
from kernels.moe_gemm_ready import HELPERS as READY_HELPERS
from kernels.moe_gemm_ready import KERNELS as READY_KERNELS
from kernels.moe_gemm_ready import (  # noqa: F401 - the kernels call them
    _a_tile_ready,
    _mma_col_of,
    _mma_cols,
    _x_ready_kernel,
)

jit = KernelSet(globals())
for _helper in HELPERS + AHEAD_HELPERS + READY_HELPERS + READY_KERNELS:
    jit(_helper)


@jit
def _mma(a, w, acc, SWAP_AB: tl.constexpr, IEEE: tl.constexpr):
    """exact: acc += a·wᵀ ([BM, BN]) or, swapped, w·aᵀ ([BN, BM])."""
    # One return at the end: the compiler also visits code after a constexpr-taken return.
    if SWAP_AB:
        if IEEE:
            out = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
        else:
            out = tl.dot(w, tl.trans(a), acc)
    else:
        if IEEE:
            out = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            out = tl.dot(a, tl.trans(w), acc)
    return out


@jit
def _mma1(a, w, acc, SWAP_AB: tl.constexpr):
    """fast: acc += a·wᵀ ([BM, BN]) or, swapped, w·aᵀ ([BN, BM]); fp16 operands."""
    if SWAP_AB:  # noqa: SIM108 - a Triton constexpr branch, kept explicit
        out = tl.dot(w, tl.trans(a), acc)
    else:
        out = tl.dot(a, tl.trans(w), acc)
    return out


@jit
def _pdl_start(PDL: tl.constexpr):
    """Programmatic dependent launch: wait for the previous kernel's results (it may still be
    finishing when this one starts), then let the next kernel start launching."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@jit
def _tile_of(pid, MAX_TILES, NUM_N, GROUP_M: tl.constexpr):
    width = GROUP_M * NUM_N
    first = (pid // width) * GROUP_M
    size = tl.minimum(MAX_TILES - first, GROUP_M)
    return first + (pid % width) % size, (pid % width) // size


@jit
def _k_step(A, a_row, W, S, w_row, s_row, smask, stride_sg, k0, k_hi, acc, A_DTYPE: tl.constexpr,
            BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr,
            FAST: tl.constexpr, EMULATE: tl.constexpr, MASK_K: tl.constexpr,
            WIDE: tl.constexpr, READY: tl.constexpr = False):
    if FAST:
        if READY:  # activations already fp16 in MMA order (kernels/moe_gemm_ready.py)
            xa = _a_tile_ready(A, a_row, k0, k_hi, BLOCK_K, MASK_K)
        else:
            xa = _a_tile_fast(A, a_row, k0, k_hi, BLOCK_K, MASK_K)
        w = _w_tile_fast(W, S, w_row, s_row, smask, stride_sg, k0, k_hi, BLOCK_K, EMULATE,
                         MASK_K, WIDE)
        acc = _mma1(xa, w, acc, SWAP_AB)
    else:
        ae, ao = _a_tile(A, a_row, k0, k_hi, BLOCK_K, MASK_K)
        w_lo, w_hi = _w_tile(W, S, w_row, s_row, smask, stride_sg, k0, k_hi, A_DTYPE,
                             BLOCK_K, MASK_K)
        acc = _mma(ae, w_lo, acc, SWAP_AB, IEEE)
        acc = _mma(ao, w_hi, acc, SWAP_AB, IEEE)
    return acc


@jit
def _mainloop(A, a_row, W, S, w_row, s_row, smask, stride_sg, k_lo, k_hi, acc,
              A_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
              IEEE: tl.constexpr, FAST: tl.constexpr, EMULATE: tl.constexpr,
              PREFETCH: tl.constexpr, WIDE: tl.constexpr, SC_AHEAD: tl.constexpr = False,
              READY: tl.constexpr = False):
    """acc += A[rows, k_lo:k_hi] · W[rows', k_lo:k_hi]ᵀ (or its transpose with SWAP_AB). Rows
    are all in bounds (callers clamp them and mask the stores): the whole K blocks load without
    any mask; only a last partial block masks at k_hi.
    PREFETCH = d > 0: before step i's loads, ask L2 for the codes and exponents of step i + d
    (kernels/moe_dequant._l2_prefetch; steps 1 … d−1 before the loop), so d steps of weight bytes
    are on their way from DRAM while a step waits for its own loads and does its math — without
    registers (a register-carried prefetch was tried: the loop-carried raw tile keeps Triton
    from moving the MMA operand's layout conversion onto the bytes, see notes/moe.md). The
    step's loads then wait an L2 round trip; num_stages ≥ 2 can hide that one. WIDE: 16-byte
    code loads (kernels/moe_dequant._w_tile_fast). Neither changes any result. READY (fast
    path): A is fp16 in MMA column order already, loaded as is (kernels/moe_gemm_ready.py)."""
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    k_last = k_full - BLOCK_K  # prefetches past the last whole step re-ask for it (in bounds)
    if PREFETCH > 1:  # noqa: SIM102 - a constexpr branch around a runtime one
        if k_full > k_lo:
            for j in tl.static_range(1, PREFETCH):
                _l2_prefetch(W, S, w_row, s_row, stride_sg,
                             tl.minimum(k_lo + j * BLOCK_K, k_last), BLOCK_K, EMULATE)
    if SC_AHEAD and FAST:
        # exponents one step ahead in registers (kernels/moe_gemm_ahead.py), issued first
        sc = _scales(S, s_row, smask, stride_sg, k_lo, k_full > k_lo, BLOCK_K)
        for k0 in range(k_lo, k_full, BLOCK_K):
            if PREFETCH > 0:
                _l2_prefetch(W, S, w_row, s_row, stride_sg,
                             tl.minimum(k0 + PREFETCH * BLOCK_K, k_last), BLOCK_K, EMULATE)
            sc_next = _scales(S, s_row, smask, stride_sg, tl.minimum(k0 + BLOCK_K, k_last),
                              True, BLOCK_K)
            if READY:
                xa = _a_tile_ready(A, a_row, k0, k_hi, BLOCK_K, False)
            else:
                xa = _a_tile_fast(A, a_row, k0, k_hi, BLOCK_K, False)
            w = _w_tile_fast_sc(W, w_row, sc, k0, BLOCK_K, EMULATE, WIDE)
            acc = _mma1(xa, w, acc, SWAP_AB)
            sc = sc_next
    else:
        for k0 in range(k_lo, k_full, BLOCK_K):
            if PREFETCH > 0:
                _l2_prefetch(W, S, w_row, s_row, stride_sg,
                             tl.minimum(k0 + PREFETCH * BLOCK_K, k_last), BLOCK_K, EMULATE)
            acc = _k_step(A, a_row, W, S, w_row, s_row, smask, stride_sg, k0, k_hi, acc,
                          A_DTYPE, BLOCK_K, SWAP_AB, IEEE, FAST, EMULATE, False, WIDE, READY)
    if k_full < k_hi:
        acc = _k_step(A, a_row, W, S, w_row, s_row, smask, stride_sg, k_full, k_hi, acc,
                      A_DTYPE, BLOCK_K, SWAP_AB, IEEE, FAST, EMULATE, True, False, READY)
    return acc


@jit
def _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M: tl.constexpr):
    """(expert, rows [BLOCK_M], row mask) of a tile; expert −1 past the last tile."""
    e = tl.load(TILE_E + tile)
    rows = tl.load(TILE_START + tile) + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(TILE_END + tile)


@jit(do_not_specialize=("MAX_TILES",))
def _gemm1_swiglu_kernel(
    X, stride_x, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg, B, stride_be,
    SORTED, TILE_E, TILE_START, TILE_END, OUT, stride_o, N2, K, MAX_TILES, alpha, limit,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0,
    WIDE: tl.constexpr = False, SC_AHEAD: tl.constexpr = False, READY: tl.constexpr = False,
    RND_BF16: tl.constexpr = False,
):
    """OUT[row, n] = swiglu(h[2n], h[2n+1]), h = x[token(row)]·W1[e]ᵀ + b1[e]; a program owns
    BLOCK_N consecutive (interleaved gate/linear) rows of W1 and splits them after the dot.
    READY: X is x already fp16 in MMA column order (the matmul still rounds to x's own dtype,
    bf16 where RND_BF16), and OUT's columns are stored in that order for GEMM 2."""
    # the matmul's rounding, as in the reference (x's dtype: with READY, X holds fp16)
    DTYPE: tl.constexpr = tl.bfloat16 if RND_BF16 else X.dtype.element_ty
    HALF: tl.constexpr = BLOCK_N // 2
    _pdl_start(PDL)
    tile, pid_n = _tile_of(tl.program_id(0), MAX_TILES, tl.cdiv(N2, BLOCK_N), GROUP_M)
    e, rows, rmask = _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M)
    if e < 0:
        return
    tok = tl.load(SORTED + rows, mask=rmask, other=0) // TOPK  # rows past the tile: token 0
    n2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    n2c = tl.minimum(n2, N2 - 1).to(tl.int64)  # rows past N2 re-read the last one, never stored
    w_row = e64 * stride_we + n2c * stride_wn
    # scales: unclamped rows + a mask, which keeps them contiguous for vector loads
    s_row = e64 * stride_se + n2.to(tl.int64) * stride_sn
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(X, tok.to(tl.int64) * stride_x, W, S, w_row, s_row, n2 < N2, stride_sg, 0, K,
                    acc, DTYPE, BLOCK_K, SWAP_AB, IEEE, FAST, EMULATE, PREFETCH, WIDE, SC_AHEAD,
                    READY)
    bias = tl.load(B + e64 * stride_be + n2, mask=n2 < N2, other=0.0)
    n = pid_n * HALF + tl.arange(0, HALF)  # swiglu outputs
    if SWAP_AB:
        h = acc.to(DTYPE).to(tl.float32) + bias[:, None]  # [BLOCK_N, BLOCK_M]
        gate, lin = tl.split(tl.permute(tl.reshape(h, (HALF, 2, BLOCK_M)), (0, 2, 1)))
        rr, nn = rows[None, :], n[:, None]
        mm = rmask[None, :] & (2 * nn < N2)
    else:
        h = acc.to(DTYPE).to(tl.float32) + bias[None, :]  # [BLOCK_M, BLOCK_N]
        gate, lin = tl.split(tl.reshape(h, (BLOCK_M, HALF, 2)))
        rr, nn = rows[:, None], n[None, :]
        mm = rmask[:, None] & (2 * nn < N2)
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    if READY:  # GEMM 2 reads these columns in MMA order (kernels/moe_gemm_ready.py)
        nn = _mma_col_of(nn)
    tl.store(OUT + rr.to(tl.int64) * stride_o + nn, act.to(OUT.dtype.element_ty), mask=mm)


@jit
def _combine_rows(Y, stride_split, stride_y, POS, OUT, stride_o, t0, T, n, nmask,
                  TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """OUT[t, n] = Σ_j Σ_s Y[s, pos[t·k + j], n] for t in t0 … t0+BLOCK_T, fp32, fixed order."""
    t = t0 + tl.arange(0, BLOCK_T)
    tm = t < T
    m2 = tm[:, None] & nmask[None, :]
    acc = tl.zeros([BLOCK_T, n.shape[0]], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(POS + t * TOPK + j, mask=tm, other=0).to(tl.int64)
        for s in tl.static_range(SPLIT_K):
            ptr = Y + s * stride_split + row[:, None] * stride_y + n[None, :]
            # .cg: written by other SMs, read once from L2
            acc += tl.load(ptr, mask=m2, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(OUT + t.to(tl.int64)[:, None] * stride_o + n[None, :],
             acc.to(OUT.dtype.element_ty), mask=m2)


@jit(do_not_specialize=("MAX_TILES", "stride_split", "T", "ROWS"))
def _gemm2_scale_kernel(
    A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg, B, stride_be, RW,
    SORTED, TILE_E, TILE_START, TILE_END, OUT, stride_split, stride_o, N, K, MAX_TILES,
    POS, NUM_TILES, COUNTERS, FINAL, stride_f, T, ROWS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
    EMULATE: tl.constexpr, SPLIT_K: tl.constexpr, FUSE_COMBINE: tl.constexpr,
    TOPK: tl.constexpr, COMBINE_T: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0,
    WIDE: tl.constexpr = False, SC_AHEAD: tl.constexpr = False, READY: tl.constexpr = False,
):
    """OUT[row, n] = (A[row]·W2[e, n]ᵀ + b2[e, n]) · RW[pair(row)], n < N = H. With SPLIT_K > 1
    program s sums its share of K into OUT[s] (fp32; bias on s = 0 only, no rounding).
    FUSE_COMBINE: the last program to finish an N block (a counter per block, reset after use)
    also sums every token's k·S rows of that block into FINAL [T, H], in the combine kernel's
    order: one launch less, same bits."""
    DTYPE: tl.constexpr = OUT.dtype.element_ty  # the matmul's rounding, as in the reference
    _pdl_start(PDL)
    pid = tl.program_id(0)
    split = pid % SPLIT_K
    tile, pid_n = _tile_of(pid // SPLIT_K, MAX_TILES, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, rows, rmask = _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M)
    if e < 0:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    e64 = e.to(tl.int64)
    nc = tl.minimum(n, N - 1).to(tl.int64)  # rows past N re-read the last one, never stored
    w_row = e64 * stride_we + nc * stride_wn
    s_row = e64 * stride_se + n.to(tl.int64) * stride_sn  # unclamped + mask: vector loads
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * k_len
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_row = tl.minimum(rows, ROWS - 1).to(tl.int64) * stride_a  # in bounds; stores are masked
    acc = _mainloop(A, a_row, W, S, w_row, s_row, nmask, stride_sg, k_lo,
                    tl.minimum(k_lo + k_len, K), acc, A.dtype.element_ty, BLOCK_K, SWAP_AB, IEEE,
                    FAST, EMULATE, PREFETCH, WIDE, SC_AHEAD, READY)
    rw = tl.load(RW + tl.load(SORTED + rows, mask=rmask, other=0), mask=rmask, other=0.0)
    if SWAP_AB:
        rr, nn, mm, rw = rows[None, :], n[:, None], rmask[None, :] & nmask[:, None], rw[None, :]
    else:
        rr, nn, mm, rw = rows[:, None], n[None, :], rmask[:, None] & nmask[None, :], rw[:, None]
    bias = tl.load(B + e64 * stride_be + nn, mask=mm & (split == 0), other=0.0)
    y = (acc.to(DTYPE).to(tl.float32) + bias) * rw  # split partials are fp32: no rounding
    out = OUT + split.to(tl.int64) * stride_split + rr.to(tl.int64) * stride_o + nn
    tl.store(out, y.to(DTYPE), mask=mm)
    if FUSE_COMBINE:
        tl.debug_barrier()  # every thread's stores precede the release below
        done = tl.atomic_add(COUNTERS + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == tl.load(NUM_TILES) * SPLIT_K - 1:
            tl.debug_barrier()
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            for t0 in range(0, T, COMBINE_T):
                _combine_rows(OUT, stride_split, stride_o, POS, FINAL, stride_f, t0, T, n,
                              n < N, TOPK, SPLIT_K, COMBINE_T)
            tl.store(COUNTERS + pid_n, 0)  # ready for the next launch (and graph replay)


@jit(do_not_specialize=("stride_split", "T"))
def _combine_kernel(
    Y, stride_split, stride_y, POS, OUT, stride_o, T, H, TOPK: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    """OUT[t] = Σ_j Σ_s Y[s, pos[t·k + j]] in fp32, in a fixed order: deterministic, no atomics."""
    _pdl_start(PDL)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _combine_rows(Y, stride_split, stride_y, POS, OUT, stride_o, tl.program_id(0) * BLOCK_T, T,
                  h, h < H, TOPK, SPLIT_K, BLOCK_T)
