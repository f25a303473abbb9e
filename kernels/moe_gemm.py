"""Grouped GEMMs of the MoE on MXFP4 expert weights, dequantized in the kernel.

Rows are the token/expert pairs in expert order (kernels/moe_routing.py), in tiles of BLOCK_M
rows of one expert e. With W[e] MXFP4 (value = fp4(code) · 2^(scale − 127), runtime/mxfp4.py):
    GEMM 1:  h = x[token(row)]·W1[e]ᵀ + b1[e]            gate = h[0::2], linear = h[1::2]
             act[row] = swiglu(gate, linear)             g·σ(α·g)·(clamp(l, ±L) + 1), g = min(g, L)
    GEMM 2:  y[row] = (act[row]·W2[e]ᵀ + b2[e]) · w_router(row)
Each matmul is rounded to the activation dtype before the fp32 bias (as torch's matmul is in
kernels/moe_ref.py); accumulation is fp32.

Weights are read in the checkpoint's own layout: output row n's K/2 code bytes are contiguous
([E, N, K/2] u8) and its K/32 scale bytes too. A program owns BLOCK_N output features; the
interleaved gate/linear rows of W1 are read as two row sets (2n and 2n + 1), each row a
contiguous run, so swiglu fuses without any repacking. The low nibble holds the even k and the
high nibble the odd k: the kernel splits the activations into even and odd columns instead of
interleaving the weights, and takes two dots of depth BLOCK_K/2.

Dequantization without a table: code c → fp16 bits (sign c₃ at bit 15, c₀…c₂ at bits 9…11) is
exactly fp4(c)·2⁻¹⁴ (fp16's subnormals line up with e2m1's), then one fp32 multiply by the
group's 2^(s − 113) built from its exponent bits (valid for scale bytes ≤ 240, |w| < 6·2¹¹³).

SWAP_AB computes the transposed product (Wᵀ as the left operand): with few rows per expert (decode)
the weights fill the MMA's M side instead of padding 16-token tiles.
Grid: one program per (tile, N block), tiles of one N block grouped GROUP_M at a time so the
programs running together share the expert's weights in L2. Tiles past the routing's last are
idle (expert −1): the grid has a fixed size and the launch can be captured in a CUDA graph.
MoE grouped GEMM (MegaBlocks): https://arxiv.org/abs/2211.15841; OCP MX formats v1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet, interpret_forced
from kernels.moe_dequant import (  # noqa: F401 - the kernels call them
    _E2M1_X4_ASM,
    HELPERS,
    _a_tile,
    _a_tile_fast,
    _e2m1_x4_emulated,
    _fp4_f32,
    _w_tile,
    _w_tile_fast,
)
from kernels.moe_routing import RoutingPlan

jit = KernelSet(globals())
for _helper in HELPERS:
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
def _tile_of(pid, MAX_TILES, NUM_N, GROUP_M: tl.constexpr):
    width = GROUP_M * NUM_N
    first = (pid // width) * GROUP_M
    size = tl.minimum(MAX_TILES - first, GROUP_M)
    return first + (pid % width) % size, (pid % width) // size


@jit
def _mainloop(A, a_row, amask, W, S, w_row, s_row, nmask, k_lo, k_hi, acc,
              A_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
              IEEE: tl.constexpr, FAST: tl.constexpr, EMULATE: tl.constexpr):
    """acc += A[rows, k_lo:k_hi] · W[rows', k_lo:k_hi]ᵀ (or its transpose with SWAP_AB)."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FAST:
            xa = _a_tile_fast(A, a_row, amask, k0, k_hi, BLOCK_K)
            w = _w_tile_fast(W, S, w_row, s_row, nmask, k0, k_hi, BLOCK_K, EMULATE)
            acc = _mma1(xa, w, acc, SWAP_AB)
        else:
            ae, ao = _a_tile(A, a_row, amask, k0, k_hi, BLOCK_K)
            w_lo, w_hi = _w_tile(W, S, w_row, s_row, nmask, k0, k_hi, A_DTYPE, BLOCK_K)
            acc = _mma(ae, w_lo, acc, SWAP_AB, IEEE)
            acc = _mma(ao, w_hi, acc, SWAP_AB, IEEE)
    return acc


@jit
def _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M: tl.constexpr):
    """(expert, rows [BLOCK_M], row mask) of a tile; expert −1 past the last tile."""
    e = tl.load(TILE_E + tile)
    rows = tl.load(TILE_START + tile) + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(TILE_END + tile)


@jit
def _gemm1_swiglu_kernel(
    X, stride_x, W, stride_we, stride_wn, S, stride_se, stride_sn, B, stride_be,
    SORTED, TILE_E, TILE_START, TILE_END, OUT, stride_o, N2, K, MAX_TILES, alpha, limit,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """OUT[row, n] = swiglu(h[2n], h[2n+1]), h = x[token(row)]·W1[e]ᵀ + b1[e]; a program owns
    BLOCK_N consecutive (interleaved gate/linear) rows of W1 and splits them after the dot."""
    DTYPE: tl.constexpr = X.dtype.element_ty  # the matmul's rounding, as in the reference
    HALF: tl.constexpr = BLOCK_N // 2
    tile, pid_n = _tile_of(tl.program_id(0), MAX_TILES, tl.cdiv(N2, BLOCK_N), GROUP_M)
    e, rows, rmask = _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M)
    if e < 0:
        return
    tok = tl.load(SORTED + rows, mask=rmask, other=0) // TOPK
    n2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    w_row = e64 * stride_we + n2.to(tl.int64) * stride_wn
    s_row = e64 * stride_se + n2.to(tl.int64) * stride_sn
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(X, tok.to(tl.int64) * stride_x, rmask, W, S, w_row, s_row, n2 < N2, 0, K,
                    acc, DTYPE, BLOCK_K, SWAP_AB, IEEE, FAST, EMULATE)
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
    tl.store(OUT + rr.to(tl.int64) * stride_o + nn, act.to(OUT.dtype.element_ty), mask=mm)


@jit
def _gemm2_scale_kernel(
    A, stride_a, W, stride_we, stride_wn, S, stride_se, stride_sn, B, stride_be, RW,
    SORTED, TILE_E, TILE_START, TILE_END, OUT, stride_split, stride_o, N, K, MAX_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
    EMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """OUT[row, n] = (A[row]·W2[e, n]ᵀ + b2[e, n]) · RW[pair(row)], n < N = H. With SPLIT_K > 1
    program s sums its share of K into OUT[s] (fp32; bias on s = 0 only, no rounding)."""
    DTYPE: tl.constexpr = OUT.dtype.element_ty  # the matmul's rounding, as in the reference
    pid = tl.program_id(0)
    split = pid % SPLIT_K
    tile, pid_n = _tile_of(pid // SPLIT_K, MAX_TILES, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, rows, rmask = _tile_rows(TILE_E, TILE_START, TILE_END, tile, BLOCK_M)
    if e < 0:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    e64 = e.to(tl.int64)
    w_row = e64 * stride_we + n.to(tl.int64) * stride_wn
    s_row = e64 * stride_se + n.to(tl.int64) * stride_sn
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * k_len
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(A, rows.to(tl.int64) * stride_a, rmask, W, S, w_row, s_row, nmask, k_lo,
                    tl.minimum(k_lo + k_len, K), acc, A.dtype.element_ty, BLOCK_K, SWAP_AB,
                    IEEE, FAST, EMULATE)
    rw = tl.load(RW + tl.load(SORTED + rows, mask=rmask, other=0), mask=rmask, other=0.0)
    if SWAP_AB:
        rr, nn, mm, rw = rows[None, :], n[:, None], rmask[None, :] & nmask[:, None], rw[None, :]
    else:
        rr, nn, mm, rw = rows[:, None], n[None, :], rmask[:, None] & nmask[None, :], rw[:, None]
    bias = tl.load(B + e64 * stride_be + nn, mask=mm & (split == 0), other=0.0)
    y = (acc.to(DTYPE).to(tl.float32) + bias) * rw  # split partials are fp32: no rounding
    out = OUT + split.to(tl.int64) * stride_split + rr.to(tl.int64) * stride_o + nn
    tl.store(out, y.to(DTYPE), mask=mm)


@jit
def _combine_kernel(
    Y, stride_split, stride_y, POS, OUT, stride_o, H, TOPK: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """OUT[t] = Σ_j Σ_s Y[s, pos[t·k + j]] in fp32, in a fixed order: deterministic, no atomics."""
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(POS + t * TOPK + j).to(tl.int64)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(Y + s * stride_split + row * stride_y + h, mask=hm,
                           other=0.0).to(tl.float32)
    tl.store(OUT + t.to(tl.int64) * stride_o + h, acc.to(OUT.dtype.element_ty), mask=hm)


# ---- launchers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmTiles:
    """Block shape and launch parameters of one grouped GEMM (BLOCK_M comes from the routing).
    block_n counts weight rows: for GEMM 1 interleaved gate/linear rows (block_n/2 outputs)."""

    block_n: int
    block_k: int
    swap_ab: bool = False
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # GEMM 2 only: K split over programs, partial sums reduced by the combine

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "group_m", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemmTiles.{name} must be a power of two, got {v}")
        if self.block_n < 16 or self.block_k < 32:
            raise ValueError(f"GemmTiles: block_n ≥ 16 and block_k ≥ 32, got {self}")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"GemmTiles: num_stages and split_k must be ≥ 1, got {self}")


def _check_mxfp4(name: str, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor, n: int, k: int,
                 e: int, device: torch.device) -> None:
    want = ((e, n, k // 2), (e, n, k // 32), (e, n))
    got = (tuple(w.shape), tuple(s.shape), tuple(b.shape))
    if got != want:
        raise ValueError(f"{name}: codes/scales/bias shapes {got}, expected {want}")
    if w.dtype != torch.uint8 or s.dtype != torch.uint8 or b.dtype != torch.float32:
        raise ValueError(f"{name}: codes/scales/bias dtypes {w.dtype}/{s.dtype}/{b.dtype}, "
                         "expected u8/u8/fp32")
    if w.stride(2) != 1 or s.stride(2) != 1 or b.stride(1) != 1:
        raise ValueError(f"{name}: codes, scales and bias need a contiguous last dimension")
    for t in (w, s, b):
        if t.device != device:
            raise ValueError(f"{name}: weights on {t.device}, activations on {device}")


def _launch_args(tiles: GemmTiles, dtype: torch.dtype, fast: bool, device: torch.device) -> dict:
    if fast and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the fast (fp16 MMA) path needs fp16/bf16 activations, got {dtype}")
    emulate = device.type != "cuda" or interpret_forced()  # the interpreter cannot run PTX
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                SWAP_AB=tiles.swap_ab, IEEE=dtype == torch.float32, FAST=fast, EMULATE=emulate,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def gemm1_swiglu(
    x: torch.Tensor,  # [T, H] activations
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor,  # [E, 2I, H/2] u8, [E, 2I, H/32] u8, [E, 2I]
    plan: RoutingPlan, top_k: int, alpha: float, limit: float, tiles: GemmTiles,
    fast: bool = False,
) -> torch.Tensor:
    """→ act [T·k, I], rows in the plan's expert order: in x's dtype, or fp16 with `fast`
    (|act| ≤ L·(L + 1) = 56 fits fp16, the next GEMM's MMA type)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"gemm1: x must be [T, H] with unit column stride, got {tuple(x.shape)}")
    t, h = x.shape
    e, n2 = w.shape[0], w.shape[1]
    _check_mxfp4("gemm1", w, s, b, n2, h, e, x.device)
    if n2 % 2 or plan.pos.shape[0] != t * top_k:
        raise ValueError(f"gemm1: 2I = {n2} must be even and the plan must hold T·k = {t * top_k}")
    if tiles.split_k != 1:
        raise ValueError("gemm1: swiglu needs whole sums, split_k must be 1")
    inter = n2 // 2
    out = torch.empty(t * top_k, inter, dtype=torch.float16 if fast else x.dtype, device=x.device)
    if t == 0:
        return out
    grid = (plan.max_tiles * triton.cdiv(n2, tiles.block_n),)
    jit["_gemm1_swiglu_kernel"][grid](
        x, x.stride(0), w, w.stride(0), w.stride(1), s, s.stride(0), s.stride(1), b, b.stride(0),
        plan.sorted_pair, plan.tile_expert, plan.tile_start, plan.tile_end, out, out.stride(0),
        n2, h, plan.max_tiles, float(alpha), float(limit),
        TOPK=top_k, BLOCK_M=plan.block_m, **_launch_args(tiles, x.dtype, fast, x.device),
    )
    return out


def gemm2_scale(
    act: torch.Tensor,  # [T·k, I] rows in expert order
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor,  # [E, H, I/2] u8, [E, H, I/32] u8, [E, H]
    plan: RoutingPlan, tiles: GemmTiles, fast: bool = False, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """→ y [S, T·k, H] (S = tiles.split_k): each row's expert output times its router weight.
    S = 1: in out_dtype (default act's), the matmul rounded to it before the bias as in the
    reference; S > 1: fp32 partial sums over K/S each (the bias in the first)."""
    if act.dim() != 2 or act.stride(1) != 1 or act.shape[0] != plan.pos.shape[0]:
        raise ValueError(f"gemm2: act must be [T·k, I] (unit column stride), got {tuple(act.shape)}")
    rows, inter = act.shape
    e, h = w.shape[0], w.shape[1]
    _check_mxfp4("gemm2", w, s, b, h, inter, e, act.device)
    split = tiles.split_k
    dtype = (out_dtype or act.dtype) if split == 1 else torch.float32
    out = torch.empty(split, rows, h, dtype=dtype, device=act.device)
    if rows == 0:
        return out
    grid = (plan.max_tiles * triton.cdiv(h, tiles.block_n) * split,)
    jit["_gemm2_scale_kernel"][grid](
        act, act.stride(0), w, w.stride(0), w.stride(1), s, s.stride(0), s.stride(1), b,
        b.stride(0), plan.weights, plan.sorted_pair, plan.tile_expert, plan.tile_start,
        plan.tile_end, out, out.stride(0), out.stride(1), h, inter, plan.max_tiles,
        BLOCK_M=plan.block_m, SPLIT_K=split, **_launch_args(tiles, act.dtype, fast, act.device),
    )
    return out


def combine(y: torch.Tensor, plan: RoutingPlan, top_k: int,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [S, T·k, H] in expert order → [T, H] (out_dtype, default y's): each token's k·S rows
    summed in fp32."""
    split, rows, h = y.shape
    t = rows // top_k
    out = torch.empty(t, h, dtype=out_dtype or y.dtype, device=y.device)
    if t == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(h))
    jit["_combine_kernel"][(t, triton.cdiv(h, block_h))](
        y, y.stride(0), y.stride(1), plan.pos, out, out.stride(0), h, TOPK=top_k, SPLIT_K=split,
        BLOCK_H=block_h, num_warps=4,
    )
    return out
