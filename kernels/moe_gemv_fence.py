"""The f16 GEMV step with every load of a step issued before its first math (`GemvTiles.loads_first`).

On sm_90a ptxas schedules the plain f16 step (kernels/moe_gemv_dequant.py) by its own model: it
issues 5–6 of a thread's ten 16-byte loads (its second (row, group)'s codes and x) and the scale
bytes after the first group's math, so each step waits on ≥ 2 dependent DRAM round trips where
the f32 step waits once (notes/moe.md "GEMV scale words"). Here the first code word of each of
the thread's (row, group) slots is OR-ed with a value that depends on one register of every load
of the step — both slots' codes, x pairs and scale bytes — AND-ed with a zero ptxas cannot
prove (%dynamic_smem_size >> 31). So the first dequantization instruction waits
for all loads and ptxas cannot sink any of them below it; the words, and so the products, the
order and the bits, are the plain f16 step's. Costs a few LOP3 per (row, group) and step.
Plain functions, registered in moe_gemv_kernels' KernelSet (they run with its globals).
"""

from __future__ import annotations

import triton.language as tl

from kernels.moe_gemv_dequant import F16, _gemv_step_f32, _load_f16, _math_f16, _split4

PF_FENCE: tl.constexpr = tl.constexpr(4)  # the PREFETCH value of GemvTiles.loads_first
# $1 & (dynamic shared memory size >> 31): 0 (a launch's size is < 2 GB), opaque to ptxas.
_ZERO_AND_ASM = tl.constexpr(
    "{ .reg .u32 z; mov.u32 z, %dynamic_smem_size; shr.u32 z, z, 31; and.b32 $0, $1, z; }")


def _fence_f16(words, sc, xe, xo, k_bound, EMULATE: tl.constexpr):
    """words [BN, NG, 4] int32 with its first word of each (row, group) OR-ed with 0 computed
    from one register of every load (codes, x, scales) of every slot the thread holds."""
    BN: tl.constexpr = words.shape[0]
    NG: tl.constexpr = words.shape[1]
    w0, w1, w2, w3 = _split4(words)  # [BN, NG]
    e0, e1, e2, e3 = _split4(xe)  # [NG] int64 (16-byte loads: e0, e1 | e2, e3)
    o0, o1, o2, o3 = _split4(xo)
    xd = (e0 ^ e2 ^ o0 ^ o2).to(tl.int32)  # [NG]: one register of each x load
    d = w0 ^ xd[None, :] ^ sc.to(tl.int32)  # [BN, NG]
    # A thread's two slots are groups g and g + NG/2 of one row (the 16-byte code loads' layout
    # at BN = 32, NG = 8, 4 warps): fold them (elsewhere the fold may cost shuffles).
    if NG >= 2:
        d = tl.reduce(tl.reshape(d, (BN, 2, NG // 2)), 1, _xor)  # [BN, NG/2]
    if EMULATE:  # the interpreter: the same zero, in plain Triton
        d = d & (k_bound >> 31)
    else:  # a zero neither LLVM nor ptxas can prove (k_bound's sign they sometimes can)
        d = tl.inline_asm_elementwise(_ZERO_AND_ASM, "=r,r", [d], dtype=tl.int32, is_pure=True,
                                      pack=1)
    if NG >= 2:
        d = tl.reshape(tl.broadcast_to(d[:, None, :], (BN, 2, NG // 2)), (BN, NG))
    return tl.join(tl.join(w0 | d, w2), tl.join(w1, w3)).reshape(BN, NG, 4)


def _xor(a, b):
    return a ^ b


def _gemv_step_f16_fenced(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_bound, acc,
                          BLOCK_K: tl.constexpr, MASK: tl.constexpr, EMULATE: tl.constexpr):
    """_gemv_step_f16 with all of the step's loads ahead of its math: the same bits."""
    words, sc, xe, xo = _load_f16(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_bound,
                                  BLOCK_K, MASK)
    words = _fence_f16(words, sc, xe, xo, k_bound, EMULATE)
    return _math_f16(words, sc, xe, xo, acc, EMULATE)


def _gemv_rows_fenced(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_lo, k_hi,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr,
                      EMULATE: tl.constexpr):
    """moe_gemv._gemv_rows's plain loop (whole steps unmasked, a masked last partial step) with
    the fenced f16 step; DEQ = F32 (fp32 activations): the plain f32 step."""
    acc = tl.zeros([BLOCK_N, BLOCK_K // 32], dtype=tl.float32)
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for k0 in range(k_lo, k_full, BLOCK_K):
        if DEQ == F16:
            acc = _gemv_step_f16_fenced(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi,
                                        acc, BLOCK_K, False, EMULATE)
        else:
            acc = _gemv_step_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_hi, acc,
                                 BLOCK_K, False, EMULATE)
    if k_full < k_hi:
        if DEQ == F16:
            acc = _gemv_step_f16_fenced(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_full,
                                        k_hi, acc, BLOCK_K, True, EMULATE)
        else:
            acc = _gemv_step_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k_full, k_hi, acc,
                                 BLOCK_K, True, EMULATE)
    return tl.sum(acc, axis=1)


FENCE_HELPERS = (_fence_f16, _xor, _gemv_step_f16_fenced, _gemv_rows_fenced)
