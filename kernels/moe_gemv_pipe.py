"""Latency options of the GEMV path (kernels/moe_gemv.py): loads ahead of math, fused combine.

At one token the GEMV kernels streamed at ~1.4 TB/s of the H100's ~3: each program's k-step
issued its 16-byte code loads (and, late in the SASS, its scale bytes) and then waited for them,
so per SM only the ~5 resident programs' current step (≈ 4 KB each) was in flight, and every
step paid a DRAM round trip in series with its math.

- `GemvTiles.async_copy`: the step loop marked for Triton's software pipeliner (num_stages 3):
  codes and x stream through 16-byte cp.async into shared memory, two steps ahead of the math.
- `GemvTiles.prefetch = d` (1 or 2): step i + d's codes, scale bytes and x are loaded before
  step i's math into register buffers (the loop unrolled d + 1 times; see `_gemv_rows_pf`).
In both, every load is masked by the program's K range (k_hi), so look-ahead loads past it read
nothing and the partial last step is just another step. Each group slot of the accumulator sums
the same values in the same order as the plain loop: bit-identical results.
- `GemvConfig.fuse_combine`: GEMM 2's program that finishes an N block last (one arrival
  counter per block, reset by that program, so graph replays need no memset) sums the block
  for every token exactly as `_gemv_combine_kernel` does: same bits, one launch less.
Plain functions, registered in moe_gemv_kernels' KernelSet (they run with its globals).
"""

from __future__ import annotations

import triton.language as tl

from kernels.moe_gemv_dequant import (
    F16,
    _load_f16,
    _load_f32,
    _math_f16,
    _math_f32,
)

PF_ASYNC: tl.constexpr = tl.constexpr(3)  # GemvTiles.async_copy


def _load(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi, BLOCK_K: tl.constexpr,
          DEQ: tl.constexpr):
    """The raw operands of the step at k0, groups at or past k_hi masked to zero."""
    if DEQ == F16:
        ops = _load_f16(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi, BLOCK_K, True)
    else:
        ops = _load_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi, BLOCK_K, True)
    return ops


def _math(w, sc, xe, xo, acc, DEQ: tl.constexpr, EMULATE: tl.constexpr):
    if DEQ == F16:
        acc = _math_f16(w, sc, xe, xo, acc, EMULATE)
    else:
        acc = _math_f32(w, sc, xe, xo, acc, EMULATE)
    return acc


def _gemv_rows_pf(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
                  EMULATE: tl.constexpr, PREFETCH: tl.constexpr, NUM_STAGES: tl.constexpr = 3):
    """moe_gemv._gemv_rows with the loads PREFETCH (1 or 2) steps ahead → [BLOCK_N] fp32, or
    (PREFETCH = PF_ASYNC) the plain loop marked for Triton's software pipeliner, which streams
    codes and x through cp.async (16 B) into NUM_STAGES shared-memory buffers; the scale bytes
    (1 per thread and group, too small for cp.async) stay register loads.
    The loop is unrolled PREFETCH + 1 times over as many register buffers, each refilled right
    after its math: a loop-carried copy (w0 = w1) let ptxas give the next step's loads the
    registers the math was reading, so it sank them below the math (no look-ahead at all).
    Steps past k_hi (the last round's) load nothing and add zeros."""
    acc = tl.zeros([BLOCK_N, BLOCK_K // 32], dtype=tl.float32)
    n_steps = tl.cdiv(k_hi - k_lo, BLOCK_K)
    a_w, a_s, a_e, a_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi, BLOCK_K,
                               DEQ)
    if PREFETCH == PF_ASYNC:  # Triton's pipeliner: cp.async into shared memory, num_stages deep
        for k0 in tl.range(k_lo, k_lo + n_steps * BLOCK_K, BLOCK_K, num_stages=NUM_STAGES):
            a_w, a_s, a_e, a_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi,
                                       BLOCK_K, DEQ)
            acc = _math(a_w, a_s, a_e, a_o, acc, DEQ, EMULATE)
    elif PREFETCH == 1:
        for k0 in range(k_lo, k_lo + n_steps * BLOCK_K, 2 * BLOCK_K):
            b_w, b_s, b_e, b_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0 + BLOCK_K,
                                       k_hi, BLOCK_K, DEQ)
            acc = _math(a_w, a_s, a_e, a_o, acc, DEQ, EMULATE)
            a_w, a_s, a_e, a_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg,
                                       k0 + 2 * BLOCK_K, k_hi, BLOCK_K, DEQ)
            acc = _math(b_w, b_s, b_e, b_o, acc, DEQ, EMULATE)
    else:
        b_w, b_s, b_e, b_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_lo + BLOCK_K,
                                   k_hi, BLOCK_K, DEQ)
        for k0 in range(k_lo, k_lo + n_steps * BLOCK_K, 3 * BLOCK_K):
            c_w, c_s, c_e, c_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg,
                                       k0 + 2 * BLOCK_K, k_hi, BLOCK_K, DEQ)
            acc = _math(a_w, a_s, a_e, a_o, acc, DEQ, EMULATE)
            a_w, a_s, a_e, a_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg,
                                       k0 + 3 * BLOCK_K, k_hi, BLOCK_K, DEQ)
            acc = _math(b_w, b_s, b_e, b_o, acc, DEQ, EMULATE)
            b_w, b_s, b_e, b_o = _load(XS, x_row, W, w_rows, S, s_rows, stride_sg,
                                       k0 + 4 * BLOCK_K, k_hi, BLOCK_K, DEQ)
            acc = _math(c_w, c_s, c_e, c_o, acc, DEQ, EMULATE)
    return tl.sum(acc, axis=1)


def _combine_block(PART, stride_ps, stride_pp, EXPERTS, WEIGHTS, B, stride_be, OUT, stride_o,
                   cols, n_rows, n_tokens, TOPK: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[t, cols] = Σ_j w[t, j]·(round(Σ_s part[s, t·k + j, cols]) + b2[e_tj, cols]) for every
    token: moe_gemv._gemv_combine_kernel's sums in its order (bit-identical). The partials of
    other programs are read through L2 (.cg): they were written after this SM may have cached
    nothing of them, but L1 is not coherent, so never trust it here."""
    cm = cols < n_rows
    for t in range(n_tokens):
        out = tl.zeros(cols.shape, dtype=tl.float32)
        for j in tl.static_range(TOPK):
            pair = tl.cast(t * TOPK + j, tl.int64)  # (a Python int in the interpreter)
            e = tl.load(EXPERTS + pair).to(tl.int64)
            y = tl.zeros(cols.shape, dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(PART + s * stride_ps + pair * stride_pp + cols,
                             mask=cm, other=0.0, cache_modifier=".cg")
            y = y.to(OUT.dtype.element_ty).to(tl.float32)
            y += tl.load(B + e * stride_be + cols, mask=cm, other=0.0)
            out += tl.load(WEIGHTS + pair) * y
        tl.store(OUT + tl.cast(t, tl.int64) * stride_o + cols, out.to(OUT.dtype.element_ty), mask=cm)


def _gemv2_fused_kernel(
    A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
    EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
    WEIGHTS, B, stride_be, OUT, stride_o, COUNTERS,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DEQ: tl.constexpr, EMULATE: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr = False,
):
    """moe_gemv._gemv2_kernel, then the last of the N block's n_pairs·SPLIT_K programs to arrive
    combines the block for every token into OUT (x's dtype) and resets the block's counter.
    PDL: GEMM 1's act complete before any load (no code prefetch before the wait: the next
    kernel only launches early, and its own wait covers this grid's combine)."""
    wait_then_release(PDL)  # noqa: F821 - kernels/pdl.py, registered with moe_gemv_kernels
    nb, rows = _gemv2_part(  # noqa: F821 - moe_gemv_kernels'
        A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
        EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
        SPLIT_K, BLOCK_N, BLOCK_K, DEQ, EMULATE, PREFETCH)
    tl.debug_barrier()  # every thread's partials precede the release below
    done = tl.atomic_add(COUNTERS + nb, 1, sem="acq_rel", scope="gpu")
    if done == n_pairs * SPLIT_K - 1:
        tl.debug_barrier()
        _combine_block(PART, stride_ps, stride_pp, EXPERTS, WEIGHTS, B, stride_be, OUT, stride_o,
                       rows, n_rows, n_pairs // TOPK, TOPK, SPLIT_K)
        tl.store(COUNTERS + nb, 0)  # ready for the next launch (and graph replay)


PIPE_HELPERS = (_load, _math, _gemv_rows_pf, _combine_block)
