"""Small-batch MoE on MXFP4 weights: one GEMV per (token, expert) pair, no tensor cores.

For a few tokens the layer is a pure weight stream (13.2 MB per hit expert of gpt-oss); the tile
GEMMs (kernels/moe_gemm.py) walked K in long dependent loops over a few hundred programs and sat
at ~6× the bandwidth roofline whatever the tile. Here every (pair p = t·k + j, block of BLOCK_N
weight rows[, K split]) is its own short program: ~1000+ programs at one token, each streaming
[BLOCK_N, BLOCK_K/2] code bytes per step with 16-byte loads (one MXFP4 group per thread).

    GEMM 1:  h[p] = round_x(x[t]·W1[e]ᵀ) + b1[e];  act[p] = round_x(swiglu(h[0::2], h[1::2]))
    GEMM 2:  part[s, p] = act[p, K_s]·W2[e, :, K_s]ᵀ                                    fp32
    combine: out[t] = Σ_j w[t, j]·(round_x(Σ_s part[s, t·k + j]) + b2[e_tj])           x's dtype
(round_x: rounded to x's dtype, as torch's matmul is in kernels/moe_ref.py.) Fixed-order sums:
deterministic. Grids depend on (T, k, shapes) only, experts are read on the device from the
routing's [T, k] table: capturable in a CUDA graph.

Dequantization without a table: code c → fp16 bits ((c & 8) << 12) | ((c & 7) << 9) is exactly
fp4(c)·2⁻¹⁴ (fp16 subnormals line up with e2m1's), widened to fp32 and multiplied by x; the
group's 2^(s − 127)·2¹⁴ = 2^(s − 113) (fp32 bits (s + 14) << 23) multiplies the group's partial
sum, not each element. Exact for every scale byte ≤ 240 (|w| ≤ 6·2¹¹³); prepare_moe's
`gemv_ok` sends anything else to the tile path's exact dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet
from kernels.moe_dequant import (  # noqa: F401 - the f32 step calls them
    _E2M1_X4_ASM,
    _e2m1_x4,
    _e2m1_x4_emulated,
    _fp4_f32,
)
from kernels.moe_gemm import compiled
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
    _math_f16,
    _math_f32,
    _nib_f16,
    _split4,
    _word_f16_emulated,
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
from kernels.moe_gemv_split import SPLIT_K1_MAX, _gemv1_part_kernel, _swiglu_sum_kernel

jit = KernelSet(globals())
for _helper in HELPERS + PIPE_HELPERS:
    jit(_helper)
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
    if PREFETCH > 0:
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
    EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0,
):
    """One (pair, block of BLOCK_N interleaved gate/linear rows) → act[pair, BLOCK_N/2].
    XS is what is read: x itself (DEQ = 0) or its pre-split copy (per 32-group the evens, then
    the odds; fp32 or fp16) for the fast step, which also stores ACT pre-split. X: the dtype."""
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
    EMULATE: tl.constexpr, PREFETCH: tl.constexpr = 0,
):
    """One (pair, K split, block of BLOCK_N rows) → part[split, pair, rows] (fp32, no bias)."""
    _gemv2_part(A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, stride_sg,
                EXPERTS, PART, stride_ps, stride_pp, n_rows, k_dim, n_pairs, k_per_split,
                SPLIT_K, BLOCK_N, BLOCK_K, DEQ, EMULATE, PREFETCH)


@jit(do_not_specialize=("stride_ps",))
def _gemv_combine_kernel(
    PART, stride_ps, stride_pp, EXPERTS, WEIGHTS, B, stride_be, OUT, stride_o, n_rows,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, cols] = Σ_j w[t, j]·(round(Σ_s part[s, t·k + j, cols]) + b2[e_tj, cols])."""
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


# ---- launchers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvTiles:
    """One GEMV launch: BLOCK_N weight rows per program (GEMM 1: interleaved gate/linear rows,
    even), BLOCK_K per step (≥ 32, a power of two), K split over SPLIT_K programs (GEMM 2).
    dequant: "exact" (nibble by nibble), "f32" or "f16" (the fast step, kernels/moe_gemv_dequant;
    "f16" multiplies in fp16 and is used only for fp16/bf16 activations, "f32" otherwise).
    prefetch: 0 (today's loop) or 1/2: the fast step's loads that many steps ahead of their math
    in registers; async_copy: the loop through Triton's cp.async pipeliner, num_stages buffers
    (kernels/moe_gemv_pipe.py; both give today's bits)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    dequant: str = "exact"
    prefetch: int = 0
    async_copy: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvTiles.{name} must be a power of two, got {v}")
        if self.block_n < 2 or self.block_k < 32 or self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"GemvTiles: block_n ≥ 2, block_k ≥ 32, stages/split ≥ 1: {self}")
        if self.dequant not in _DEQ:
            raise ValueError(f"GemvTiles.dequant must be one of {sorted(_DEQ)}: {self}")
        if (self.prefetch not in (0, 1, 2) or (self.prefetch and self.async_copy)
                or ((self.prefetch or self.async_copy) and self.dequant == "exact")):
            raise ValueError(f"GemvTiles: prefetch 0, 1 or 2 or async_copy, only for the fast "
                             f"steps: {self}")


@dataclass(frozen=True)
class GemvConfig:
    gemm1: GemvTiles
    gemm2: GemvTiles
    # GEMM 2's last program per N block sums the block for every token (kernels/moe_gemv_pipe):
    # no combine launch, same bits. Uses moe_gemv's `counters` (zeros, left at zero).
    fuse_combine: bool = False
    # GEMM 1's K over this many programs per row block, summed + swiglu in a second launch
    # (kernels/moe_gemv_split.py): deterministic, other fp32 sums than 1 (today's one launch).
    split_k1: int = 1

    def __post_init__(self) -> None:
        if (not isinstance(self.split_k1, int) or isinstance(self.split_k1, bool)
                or not 1 <= self.split_k1 <= SPLIT_K1_MAX):
            raise ValueError(f"GemvConfig.split_k1 must be an int in 1…{SPLIT_K1_MAX}, got "
                             f"{self.split_k1!r}")


_DEQ = {"exact": 0, "f32": F32.value, "f16": F16.value}


def _deq(cfg: GemvConfig, dtype: torch.dtype) -> int:
    """One mode for both GEMMs (GEMM 1 stores act in the layout GEMM 2 reads): fp16 math only for
    fp16/bf16 activations."""
    deq = _DEQ[cfg.gemm1.dequant]
    if deq == F16 and dtype == torch.float32:
        deq = F32.value
    return deq


def presplit_dtype(cfg: GemvConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the pre-split x that moe_gemv reads for activations of `dtype` (None: the
    exact step reads x itself)."""
    deq = _deq(cfg, dtype)
    return {0: None, F32.value: torch.float32, F16.value: torch.float16}[deq]


def _launch(tiles: GemvTiles, deq: int, device: torch.device) -> dict:
    pf = PF_ASYNC.value if tiles.async_copy else tiles.prefetch
    extra = {"PREFETCH": pf} if pf else {}  # today's launch otherwise
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, DEQ=deq,
                EMULATE=not compiled(device), **extra)  # the interpreter cannot run PTX


def _words(w: torch.Tensor) -> torch.Tensor:
    """Codes [E, N, K/2] u8 as int32 words [E, N, K/8] (a view): the f16 step loads each group's
    4 words as one 16-byte vector, so every row must start 16-byte aligned."""
    if w.stride(-1) != 1 or w.data_ptr() % 16 or any(st % 16 for st in w.stride()[:-1]):
        raise ValueError(f"moe_gemv: f16 dequant needs 16-byte aligned code rows: strides "
                         f"{w.stride()}, address {w.data_ptr():#x}")
    return w.view(torch.int32)


def presplit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, K] → [T, K] in dtype, each group of 32 reordered as its 16 even k, then its 16 odd k
    (the fast step's x; one copy kernel)."""
    t, k = x.shape
    out = torch.empty(t, k // 32, 2, 16, dtype=dtype, device=x.device)
    out.copy_(x.unflatten(1, (k // 32, 16, 2)).transpose(2, 3))
    return out.view(t, k)


def moe_gemv(
    x: torch.Tensor,  # [T, H] activations
    experts: torch.Tensor,  # [T, k] int32 expert ids (the routing's)
    weights: torch.Tensor,  # [T, k] fp32 router weights
    w1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor,  # [E, 2I, H/2] u8, [E, 2I, H/32], [E, 2I]
    w2: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor,  # [E, H, I/2] u8, [E, H, I/32], [E, H]
    cfg: GemvConfig, alpha: float = 1.702, limit: float = 7.0,
    counters: torch.Tensor | None = None,  # [≥ H / block_n] int32 zeros (cfg.fuse_combine)
    xs: torch.Tensor | None = None,  # [T, H] x already pre-split in the fast step's math dtype
) -> torch.Tensor:
    """The experts of a routed batch by GEMVs: → [T, H] in x's dtype (kernels/moe_ref.experts_ref).
    Three launches (GEMM 1 + swiglu, GEMM 2 partials, combine; two with cfg.fuse_combine, one
    more with cfg.split_k1 > 1), grids fixed by (T, k, shapes). counters: the fused combine's
    arrival counters, left at zero (e.g. prepare_moe's; its last entry, the fused router's, is
    not used); None: a zeroed buffer per device kept here (one stream at a time).
    xs: presplit(x, math dtype) when the caller has it already (the fused router writes it,
    kernels/moe_router.route_fused); ignored by the exact step, which reads x itself."""
    t, h = x.shape
    top_k = experts.shape[1]
    n2, inter = w1.shape[1], w2.shape[2] * 2
    if (x.stride(1) != 1 or experts.shape != (t, top_k) or weights.shape != (t, top_k)
            or w1.shape[2] * 2 != h or w2.shape[1] != h or n2 != 2 * inter or h % 32 or inter % 32):
        raise ValueError(f"moe_gemv: shapes x {tuple(x.shape)}, experts {tuple(experts.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} disagree")
    if w1.stride(1) % 16 or w2.stride(1) % 16 or w1.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError(f"moe_gemv: code rows must be contiguous with 16-byte strides, got "
                         f"{w1.stride()}, {w2.stride()}")
    if cfg.gemm1.block_n % 2:
        raise ValueError("moe_gemv: GEMM 1 needs an even block_n (gate/linear pairs)")
    if cfg.gemm1.dequant != cfg.gemm2.dequant:
        raise ValueError("moe_gemv: both GEMMs need the same dequant (act's layout depends on it)")
    out = torch.empty_like(x)
    pairs = t * top_k
    if pairs == 0:
        return out
    ex = experts.contiguous().view(-1).to(torch.int32)
    wt = weights.contiguous().view(-1).float()
    deq = _deq(cfg, x.dtype)
    math_dtype = {0: x.dtype, F32.value: torch.float32, F16.value: torch.float16}[deq]
    if deq == 0:
        xs = x
    elif xs is None:
        xs = presplit(x, math_dtype)
    elif xs.shape != x.shape or xs.dtype != math_dtype or not xs.is_contiguous():
        raise ValueError(f"moe_gemv: xs must be contiguous {math_dtype} {tuple(x.shape)}, got "
                         f"{xs.dtype} {tuple(xs.shape)}")
    act = torch.empty(pairs, inter, dtype=math_dtype, device=x.device)
    a_in = act
    if deq == F16.value:  # codes read as int32 words, x and act as int64 (4 fp16 each)
        w1, w2, xs, a_in = _words(w1), _words(w2), xs.view(torch.int64), act.view(torch.int64)
    gemv1_swiglu(x, xs, ex, w1, s1, b1, act, top_k, cfg.gemm1, deq, alpha, limit,
                 split=cfg.split_k1 if cfg.split_k1 > 1 else None)
    g2 = cfg.gemm2
    split = g2.split_k
    k_per_split = triton.cdiv(inter // 32, split) * 32
    part = torch.empty(split, pairs, h, dtype=torch.float32, device=x.device)
    n_blocks = triton.cdiv(h, g2.block_n)
    if cfg.fuse_combine:
        cnt = _counters(counters, n_blocks, x.device)
        jit["_gemv2_fused_kernel"][(pairs * split * n_blocks,)](
            a_in, a_in.stride(0), w2, w2.stride(0), w2.stride(1), s2, s2.stride(0), s2.stride(1),
            s2.stride(2), ex, part, part.stride(0), part.stride(1), h, inter, pairs, k_per_split,
            wt, b2, b2.stride(0), out, out.stride(0), cnt,
            TOPK=top_k, SPLIT_K=split, **{"PREFETCH": 0, **_launch(g2, deq, x.device)},
        )
        return out
    jit["_gemv2_kernel"][(pairs * split * n_blocks,)](
        a_in, a_in.stride(0), w2, w2.stride(0), w2.stride(1), s2, s2.stride(0), s2.stride(1),
        s2.stride(2), ex, part, part.stride(0), part.stride(1), h, inter, pairs, k_per_split,
        SPLIT_K=split, **_launch(g2, deq, x.device),
    )
    # 128 columns per one-warp program: 23 programs per token of 20b. (1024-column programs
    # left 3 programs for one token: 4.2 µs on the H100, latency of a nearly idle GPU.)
    block_h = min(128, triton.next_power_of_2(h))
    jit["_gemv_combine_kernel"][(t, triton.cdiv(h, block_h))](
        part, part.stride(0), part.stride(1), ex, wt, b2, b2.stride(0), out, out.stride(0), h,
        TOPK=top_k, SPLIT_K=split, BLOCK_H=block_h, num_warps=1,
    )
    return out


def gemv1_swiglu(
    x: torch.Tensor, xs: torch.Tensor, ex: torch.Tensor,  # [T, H]; as read (moe_gemv); [T·k]
    w1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor, act: torch.Tensor,  # act: [T·k, I]
    top_k: int, tiles: GemvTiles, deq: int, alpha: float, limit: float, split: int | None,
) -> None:
    """GEMM 1 + bias + swiglu into act, as moe_gemv prepares the operands: one launch (split
    None), or K split over `split` programs per row block then the sum + swiglu launch
    (kernels/moe_gemv_split.py; split = 1 there gives the one launch's bits)."""
    pairs, n2, h = act.shape[0], w1.shape[1], x.shape[1]
    w_args = (w1, w1.stride(0), w1.stride(1), s1, s1.stride(0), s1.stride(1), s1.stride(2))
    grid = pairs * triton.cdiv(n2, tiles.block_n)
    if split is None:
        jit["_gemv1_swiglu_kernel"][(grid,)](
            x, xs, xs.stride(0), *w_args, b1, b1.stride(0), ex, act, act.stride(0), n2, h, pairs,
            float(alpha), float(limit), TOPK=top_k, **_launch(tiles, deq, x.device))
        return
    part = torch.empty(split, pairs, n2, dtype=torch.float32, device=x.device)
    jit["_gemv1_part_kernel"][(grid * split,)](
        xs, xs.stride(0), *w_args, ex, part, part.stride(0), part.stride(1), n2, h, pairs,
        triton.cdiv(h // 32, split) * 32, TOPK=top_k, SPLIT_K=split,
        **_launch(tiles, deq, x.device))
    block_c = min(256, triton.next_power_of_2(n2 // 2))  # 48 programs per 20b token
    jit["_swiglu_sum_kernel"][(pairs * triton.cdiv(n2 // 2, block_c),)](
        x, part, part.stride(0), part.stride(1), ex, b1, b1.stride(0), act, act.stride(0), n2,
        pairs, float(alpha), float(limit), SPLIT_K=split, BLOCK_C=block_c, DEQ=deq, num_warps=4)


_OWN_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(given: torch.Tensor | None, n_blocks: int, device: torch.device) -> torch.Tensor:
    """n_blocks arrival counters (zeros; the kernel leaves them at zero)."""
    if given is None:
        given = _OWN_COUNTERS.get(device)
        if given is None or given.numel() < n_blocks:
            given = _OWN_COUNTERS[device] = torch.zeros(max(n_blocks, 1024), dtype=torch.int32,
                                                        device=device)
        return given
    if given.dtype != torch.int32 or given.numel() < n_blocks + 1 or given.device != device:
        raise ValueError(f"moe_gemv: fuse_combine needs > {n_blocks} int32 counters on {device}, "
                         f"got {given.numel()} {given.dtype} on {given.device}")
    return given[:n_blocks]
