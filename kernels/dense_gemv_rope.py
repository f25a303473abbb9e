"""The attention's qkv projection with its norm, rope and K/V cache write in one decode launch:

    (q, s) = norm_linear_rope_small(x, residual, scale, eps, W, b, cos, sin, pos, slot, Kc, Vc, nq)
    s = round(x + residual);  y = round(rmsnorm(s)·scale · Wᵀ + b)        [M, (nq + 2·nkv)·d]
    for each head vector y_h = [y₁ | y₂] (halves of d/2) of row m, c/s = cos/sin[pos[m]]:
        rope(y_h) = [round(y₁·c − y₂·s) | round(y₂·c + y₁·s)]           (fp32 from the rounded y)
    q[m, h] = rope(y_h)                                          query heads h < nq
    Kc[slot[m], pos[m] mod C, h − nq] = rope(y_h)                key heads nq ≤ h < nq + nkv
    Vc[slot[m], pos[m] mod C, h − nq − nkv] = y_h                value heads

the composition kernels/dense_gemv_norm.norm_linear_small then kernels/rope.rope_cache_write,
with the same double rounding (the projection to x's dtype, the rotation again from that value),
so interpreted the q and the cache rows have the unfused bits.

The dense GEMV's programs own BLOCK_N weight rows; nothing needs them contiguous. Here program p
owns PAIRS = BLOCK_N / 2 rotation pairs of one head: with PER_HEAD = (d/2) / PAIRS programs per
head, head h = p // PER_HEAD and frequency indices i = (p mod PER_HEAD)·PAIRS + [0, PAIRS), rows
h·d + i (first halves) and h·d + d/2 + i (their partners). Each row is still one contiguous K
vector (the loads are the dense GEMV's), accumulated in two [M, PAIRS] halves that share the
normalized x tiles, so the rotation is elementwise in registers: no weight copy, no shuffles.
Whole programs are q, k or v programs (d is a multiple of BLOCK_N), so the epilogue branches
once per program. Positions and slots are read on the device: capturable in a CUDA graph.

As in rope_cache_write, duplicate cache targets are not ordered: no two rows of one call may map
to the same (slot, pos mod C) (decode rows are distinct sequences; the graph's padding rows all
write the dummy slot, whose contents nobody reads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.dense_gemv import DTYPES, GemvDenseTiles, _fma_step, _load_tiles
from kernels.dense_gemv import _check as _check_gemv
from kernels.dense_gemv_norm import choose_norm_tiles, norm_linear_small_ref
from kernels.dense_gemv_rope_opts import RopeGemvOpts, chosen
from kernels.jit import KernelSet
from kernels.norm_prologue import (
    _load_normed,
    _norm_inv_rms,
    _norm_tile,
    norm_prologue,
    normed_ref,
    row_block,
)
from kernels.pdl import prefetch_rows, wait_then_release
from kernels.rope import rope_cache_write_ref, split_qkv

jit = KernelSet(globals())
for _helper in (_norm_inv_rms, _norm_tile, _load_normed, _fma_step, _load_tiles):
    jit(_helper)
pdl.register(jit)


def norm_linear_rope_small_ref(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K]
    scale: torch.Tensor,  # [K] fp32
    eps: float,
    w: torch.Tensor,  # [(nq + 2·nkv)·d, K]
    b: torch.Tensor | None,  # [N]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    positions: torch.Tensor,  # [M] int
    slot_ids: torch.Tensor,  # [M] int
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    v_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    num_heads: int,  # nq
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: norm_linear_small_ref then rope_cache_write_ref → (rotated q [M, nq, d], new
    residual [M, K])."""
    qkv, s = norm_linear_small_ref(x, residual, scale, eps, w, b)  # [M, N]
    q, k, v = split_qkv(qkv, num_heads, *k_cache.shape[2:])
    q = rope_cache_write_ref(q, k, v, cos_table, sin_table, positions, slot_ids, k_cache, v_cache)
    return q, s


@jit
def _pair_loads(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, EVEN_K: tl.constexpr,
                HAS_RES: tl.constexpr):
    """One step's tiles: both halves' weight rows ([PAIRS, BLOCK_K] each) and the normalized x
    [M_P, BLOCK_K] they share; zero past K."""
    w1, xv = _load_normed(w1_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, EVEN_K, HAS_RES)
    if EVEN_K:
        w2 = tl.load(w2_ptr + k0)
    else:
        w2 = tl.load(w2_ptr + k0, mask=(k0 + k < K)[None, :], other=0.0)
    return w1, w2, xv


@jit
def _pair_loop(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv, k, K, M_P: tl.constexpr,
               PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
               EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, HAS_RES: tl.constexpr):
    """The K loop over both halves' [PAIRS, BLOCK_K] tiles, which share the normalized x tiles
    → ([PAIRS, M_P], [PAIRS, M_P]) fp32."""
    KC_: tl.constexpr = BLOCK_K // VEC
    part1 = tl.zeros([M_P, PAIRS, KC_], dtype=tl.float32)  # summed over VEC, as the dense GEMV
    part2 = tl.zeros([M_P, PAIRS, KC_], dtype=tl.float32)
    if PREFETCH:  # the next step's tiles load while this one's FMAs run
        w1, w2, xv = _pair_loads(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv, 0, k, K, EVEN_K,
                                 HAS_RES)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
            w1_n, w2_n, x_n = _pair_loads(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K,
                                          False, HAS_RES)
            part1 = _fma_step(part1, w1, xv, M_P, PAIRS, KC_, VEC)
            part2 = _fma_step(part2, w2, xv, M_P, PAIRS, KC_, VEC)
            w1, w2, xv = w1_n, w2_n, x_n
    else:
        for k0 in range(0, K, BLOCK_K):
            w1, w2, xv = _pair_loads(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, EVEN_K,
                                     HAS_RES)
            part1 = _fma_step(part1, w1, xv, M_P, PAIRS, KC_, VEC)
            part2 = _fma_step(part2, w2, xv, M_P, PAIRS, KC_, VEC)
    return tl.trans(tl.sum(part1, axis=2)), tl.trans(tl.sum(part2, axis=2))


@jit
def _gemv_loop(w_ptr, x_ptr, r_ptr, sc_ptr, inv, k, K, M_P: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_K: tl.constexpr, VEC: tl.constexpr, EVEN_K: tl.constexpr,
               PREFETCH: tl.constexpr, HAS_RES: tl.constexpr):
    """The plain norm GEMV's K loop over one [ROWS, BLOCK_K] tile → [M_P, ROWS] fp32."""
    KC_: tl.constexpr = BLOCK_K // VEC
    part = tl.zeros([M_P, ROWS, KC_], dtype=tl.float32)
    if PREFETCH:
        w, xv = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv, 0, k, K, EVEN_K, HAS_RES)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
            w_n, x_n = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, False, HAS_RES)
            part = _fma_step(part, w, xv, M_P, ROWS, KC_, VEC)
            w, xv = w_n, x_n
    else:
        for k0 in range(0, K, BLOCK_K):
            w, xv = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, EVEN_K, HAS_RES)
            part = _fma_step(part, w, xv, M_P, ROWS, KC_, VEC)
    return tl.sum(part, axis=2)


@jit(do_not_specialize=("M",))
def _gemv_rope_kernel(
    X, W, B, QO, M, K, stride_xm, stride_wn, stride_qm,
    R, SC, S_OUT, stride_rm, stride_sm, eps,  # the norm prologue's
    COS, SIN, POS, SLOT, KC, VC, CAP, skc_s, skc_c, skc_h, svc_s, svc_c, svc_h,
    NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
    M_P: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_ROW: tl.constexpr, PDL: tl.constexpr = False,
    SECTORS: tl.constexpr = 0, ONE_TILE: tl.constexpr = False, EPI_LATE: tl.constexpr = 0,
):
    PER_HEAD: tl.constexpr = HALF // PAIRS  # programs per head
    pid = tl.program_id(0)
    h = pid // PER_HEAD  # this program's head: q heads, then k, then v
    i = (pid % PER_HEAD) * PAIRS + tl.arange(0, PAIRS)  # [PAIRS] frequency indices
    rows1 = h * (2 * HALF) + i  # [PAIRS] first-half rows of W; their partners are + HALF
    if ONE_TILE:  # kernels/dense_gemv_rope_opts.py: row 2p + j is pair p's half j
        r = tl.arange(0, 2 * PAIRS)  # [BLOCK_N]
        rows = h * (2 * HALF) + (pid % PER_HEAD) * PAIRS + r // 2 + (r % 2) * HALF
        w_rows = rows.to(tl.int64) * stride_wn
        prefetch_rows(W + w_rows, K, SECTORS, PDL)  # kernels/pdl.py, as the dense GEMV
    else:
        w1_rows = rows1.to(tl.int64) * stride_wn
        w2_rows = (rows1 + HALF).to(tl.int64) * stride_wn
        prefetch_rows(W + w1_rows, K, SECTORS, PDL)
        prefetch_rows(W + w2_rows, K, SECTORS, PDL)
    wait_then_release(PDL)
    m = tl.arange(0, M_P)  # [M_P]
    m_in = tl.minimum(m, M - 1)  # rows past M repeat the last one (stores drop them)
    x_rows = m_in.to(tl.int64) * stride_xm
    r_rows = m_in.to(tl.int64) * stride_rm
    # EPI_LATE 0: the epilogue's inputs first, so their round trips (position, then its table
    # row) overlap the weight stream, at the price of registers held through the loop.
    # Positions in 32 bits (a table of P·d/2 < 2³¹ entries; a 64-bit remainder would be a
    # subroutine call).
    if EPI_LATE < 2:
        pos = tl.load(POS + m_in).to(tl.int32)  # [M_P]
        slot = tl.load(SLOT + m_in).to(tl.int64)
    if EPI_LATE == 0:
        cs_off = pos[None, :] * HALF + i[:, None]  # [PAIRS, M_P]
        c = tl.load(COS + cs_off)
        s = tl.load(SIN + cs_off)
        ring = (pos % CAP).to(tl.int64)[None, :]  # [1, M_P] the cache row
    inv = _norm_inv_rms(X, R, S_OUT, stride_xm, stride_rm, stride_sm, M, K, eps, pid == 0,
                        M_P, BLOCK_ROW, HAS_RES)  # [M_P]; program 0 writes the new residual
    k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    if ONE_TILE:
        w_ptr = W + w_rows[:, None] + k[None, :]  # [BLOCK_N, BLOCK_K]
    else:
        w1_ptr = W + w1_rows[:, None] + k[None, :]  # [PAIRS, BLOCK_K]
        w2_ptr = W + w2_rows[:, None] + k[None, :]
    x_ptr = X + x_rows[:, None] + k[None, :]  # [M_P, BLOCK_K]
    r_ptr = R + r_rows[:, None] + k[None, :]
    sc_ptr = SC + k[None, :]  # [1, BLOCK_K]
    if ONE_TILE:
        y = _gemv_loop(w_ptr, x_ptr, r_ptr, sc_ptr, inv[:, None], k, K, M_P, 2 * PAIRS, BLOCK_K,
                       VEC, EVEN_K, PREFETCH, HAS_RES)  # [M_P, BLOCK_N]
        if HAS_BIAS:
            y += tl.load(B + rows).to(tl.float32)[None, :]
        y1, y2 = tl.split(tl.reshape(y, [M_P, PAIRS, 2]))  # [M_P, PAIRS] each
        y1 = tl.trans(y1)  # [PAIRS, M_P]
        y2 = tl.trans(y2)
    else:
        y1, y2 = _pair_loop(w1_ptr, w2_ptr, x_ptr, r_ptr, sc_ptr, inv[:, None], k, K, M_P, PAIRS,
                            BLOCK_K, VEC, EVEN_K, PREFETCH, HAS_RES)
        if HAS_BIAS:
            y1 += tl.load(B + rows1).to(tl.float32)[:, None]
            y2 += tl.load(B + rows1 + HALF).to(tl.float32)[:, None]
    if EPI_LATE == 2:
        pos = tl.load(POS + m_in).to(tl.int32)
        slot = tl.load(SLOT + m_in).to(tl.int64)
    if EPI_LATE >= 1:
        cs_off = pos[None, :] * HALF + i[:, None]
        c = tl.load(COS + cs_off)
        s = tl.load(SIN + cs_off)
        ring = (pos % CAP).to(tl.int64)[None, :]
    dt = X.dtype.element_ty
    y1 = y1.to(dt)  # the projection's rounding (linear_small's output)
    y2 = y2.to(dt)
    ok = (m < M)[None, :]  # [1, M_P]
    if h < NQ + NKV:  # q or k: rotate the pairs, fp32 from the rounded projection
        a = y1.to(tl.float32)
        bb = y2.to(tl.float32)
        o1 = (a * c - bb * s).to(dt)
        o2 = (bb * c + a * s).to(dt)
        if h < NQ:
            q_ptr = QO + m[None, :].to(tl.int64) * stride_qm + rows1[:, None]  # [PAIRS, M_P]
            tl.store(q_ptr, o1, mask=ok)
            tl.store(q_ptr + HALF, o2, mask=ok)
        else:
            kc_ptr = KC + slot[None, :] * skc_s + ring * skc_c + (h - NQ) * skc_h + i[:, None]
            tl.store(kc_ptr, o1.to(KC.dtype.element_ty), mask=ok)
            tl.store(kc_ptr + HALF, o2.to(KC.dtype.element_ty), mask=ok)
    else:  # v: stored as projected
        vc_ptr = (VC + slot[None, :] * svc_s + ring * svc_c + (h - NQ - NKV) * svc_h
                  + i[:, None])
        tl.store(vc_ptr, y1.to(VC.dtype.element_ty), mask=ok)
        tl.store(vc_ptr + HALF, y2.to(VC.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cos_table: torch.Tensor,
           sin_table: torch.Tensor, positions: torch.Tensor, slot_ids: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
           tiles: GemvDenseTiles | None) -> GemvDenseTiles:
    """Raises ValueError unless the launch fits; returns its tiles (given or chosen)."""
    who = "norm_linear_rope_small"
    _check_gemv(x, w, b)  # the projection's own inputs (shapes, dtypes, strides, bias, device)
    if x.shape[1] == 0:
        raise ValueError(f"{who}: x must have K ≥ 1 columns, got {tuple(x.shape)}")
    m, n = x.shape[0], w.shape[0]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or cache.stride(3) != 1 or cache.shape != k_cache.shape
                or cache.dtype not in DTYPES):
            raise ValueError(f"{who}: {name} must be a float [S+1, C, nkv, d] with contiguous "
                             f"heads, as k_cache {tuple(k_cache.shape)}; got {cache.dtype} "
                             f"{tuple(cache.shape)}")
    nkv, d = k_cache.shape[2:]
    if d % 2 or d == 0:
        raise ValueError(f"{who}: head_dim must be even, got {d}")
    if num_heads < 1 or n != (num_heads + 2 * nkv) * d:
        raise ValueError(f"{who}: w has {n} rows, not (nq + 2·nkv)·d = ({num_heads} + 2·{nkv})"
                         f"·{d}")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if (table.dim() != 2 or table.shape[1] != d // 2 or table.dtype != torch.float32
                or not table.is_contiguous()):
            raise ValueError(f"{who}: {name} must be a contiguous fp32 [P, {d // 2}], got "
                             f"{table.dtype} {tuple(table.shape)}")
    for name, ids in (("positions", positions), ("slot_ids", slot_ids)):
        if ids.shape != (m,) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{who}: {name} must be an integer [{m}], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    t = tiles if tiles is not None else choose_norm_tiles(m, n, x.shape[1])
    if t.dot or t.block_n < 2 or (d // 2) % (t.block_n // 2):
        raise ValueError(f"{who}: tiles must be FMA tiles whose block_n / 2 divides d/2 = "
                         f"{d // 2}, got {t}")
    tensors = (cos_table, sin_table, positions, slot_ids, k_cache, v_cache)
    if any(t is not None and t.device != x.device for t in tensors):
        raise ValueError(f"{who}: all tensors must be on x's device {x.device}")
    return t


def norm_linear_rope_small(
    x: torch.Tensor,  # [M, K], M ≤ MAX_ROWS: the un-normed delta
    residual: torch.Tensor | None,  # [M, K] the residual stream so far; None: x is it
    scale: torch.Tensor,  # [K] fp32 (or an exact copy in x's dtype)
    eps: float,
    w: torch.Tensor,  # [(nq + 2·nkv)·d, K] the qkv projection
    b: torch.Tensor | None,  # [N]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    positions: torch.Tensor,  # [M] int, each in [0, P) (not checked: no host sync)
    slot_ids: torch.Tensor,  # [M] int
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    v_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    num_heads: int,  # nq
    tiles: GemvDenseTiles | None = None,
    opts: RopeGemvOpts | None = None,  # code shape (same bits); None: $GPTOSS_ROPE_GEMV's
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_linear_rope_small_ref in one launch: (rotated q [M, nq, d] contiguous, new residual
    [M, K]; x itself without a residual), k and v written into the caches. No two rows may
    target the same (slot, position mod C) (module docstring)."""
    t = _check(x, w, b, cos_table, sin_table, positions, slot_ids, k_cache, v_cache, num_heads,
               tiles)
    norm = norm_prologue(x, residual, scale, eps)
    norm.check(x, "norm_linear_rope_small")
    (m, k), n = x.shape, w.shape[0]
    nkv, d = k_cache.shape[2:]
    q = torch.empty(m, num_heads, d, dtype=x.dtype, device=x.device)  # [M, nq, d]
    if m == 0:
        if norm.resid_out is not None:
            norm.resid_out.copy_(normed_ref(x, norm)[1])
        return q, norm.new_residual(x)
    jit["_gemv_rope_kernel"][(n // t.block_n,)](
        x, w, b if b is not None else w, q, m, k, x.stride(0), w.stride(0), q.stride(0),
        *norm.launch_args(x),
        cos_table, sin_table, positions.contiguous(), slot_ids.contiguous(), k_cache, v_cache,
        k_cache.shape[1], *k_cache.stride()[:3], *v_cache.stride()[:3],
        NQ=num_heads, NKV=nkv, HALF=d // 2, M_P=triton.next_power_of_2(m),
        PAIRS=t.block_n // 2, BLOCK_K=t.block_k, VEC=16 // x.element_size(),
        HAS_BIAS=b is not None, EVEN_K=k % t.block_k == 0, PREFETCH=t.num_stages > 1,
        HAS_RES=residual is not None, BLOCK_ROW=row_block(k),
        num_warps=t.num_warps, num_stages=t.num_stages,
        **(opts if opts is not None else chosen()).constexprs(),
        **pdl.launch_args(x.device, row_bytes=k * w.element_size()),
    )
    return q, norm.new_residual(x)


__all__ = ["norm_linear_rope_small", "norm_linear_rope_small_ref"]
