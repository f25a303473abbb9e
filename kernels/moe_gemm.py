"""Launchers of the MoE grouped GEMMs (kernels in kernels/moe_gemm_kernels.py, math there).

    gemm1_swiglu: x [T, H] → act [T·k, I]        gathered by the routing order, bias + swiglu fused
    gemm2_scale:  act [T·k, I] → y [S, T·k, H]   bias, × router weight; S-way split K (fp32)
    combine:      y → out [T, H]                 Σ over each token's k·S rows, fixed order
                                                 (or fused into gemm2_scale: combine_into=)
Each checks shapes, dtypes, strides and devices, and launches on a grid whose size depends only
on (T, k, E, tiles): capturable in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels.jit import interpret_forced
from kernels.moe_gemm_kernels import jit
from kernels.moe_routing import RoutingPlan


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
    # Latency hiding (kernels/moe_gemm_kernels._mainloop; notes/moe.md "Prefetch / latency"):
    # prefetch = d > 0: each k-step asks L2 for the weight bytes of the step d ahead (no
    # register cost); wide_loads: 16-byte code loads instead of 4-byte ones. Results unchanged.
    prefetch: int = 0
    wide_loads: bool = False
    # scale_ahead (fast path): each k-step's exponents are loaded one step earlier, before the
    # codes, and carried in registers (kernels/moe_gemm_ahead.py): one round trip per step, not two.
    scale_ahead: bool = False
    # act_ready (fast path; set in both GEMMs of a config or in neither): activations stored in
    # the MMA's column order as fp16 — x by a pass before GEMM 1, act by GEMM 1's own stores —
    # so each k-step feeds its activation tile to the MMA as loaded, and the wgmma can stay in
    # flight across steps (kernels/moe_gemm_ready.py). Same bits; H and I multiples of 32.
    act_ready: bool = False
    # ptxas register cap per thread (None: the compiler's choice): more programs per SM where the
    # tile's own choice lands just above an occupancy step (65536 registers per SM).
    max_regs: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "group_m", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemmTiles.{name} must be a power of two, got {v}")
        if self.block_n < 16 or self.block_k < 32:
            raise ValueError(f"GemmTiles: block_n ≥ 16 and block_k ≥ 32, got {self}")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"GemmTiles: num_stages and split_k must be ≥ 1, got {self}")
        if self.max_regs is not None and not 64 <= self.max_regs <= 255:
            raise ValueError(f"GemmTiles.max_regs must be 64 … 255, got {self.max_regs}")
        if not 0 <= self.prefetch <= 8:
            raise ValueError(f"GemmTiles.prefetch must be 0 … 8 k-steps, got {self.prefetch}")


def _check_mxfp4(name: str, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor, n: int, k: int,
                 e: int, device: torch.device) -> None:
    want = ((e, n, k // 2), (e, n, k // 32), (e, n))
    got = (tuple(w.shape), tuple(s.shape), tuple(b.shape))
    if got != want:
        raise ValueError(f"{name}: codes/scales/bias shapes {got}, expected {want}")
    if w.dtype != torch.uint8 or s.dtype != torch.uint8 or b.dtype != torch.float32:
        raise ValueError(f"{name}: codes/scales/bias dtypes {w.dtype}/{s.dtype}/{b.dtype}, "
                         "expected u8/u8/fp32")
    if w.stride(2) != 1 or b.stride(1) != 1 or 1 not in (s.stride(1), s.stride(2)):
        raise ValueError(f"{name}: codes and bias need a contiguous last dimension, scales a "
                         "contiguous row (or group) dimension")
    for t in (w, s, b):
        if t.device != device:
            raise ValueError(f"{name}: weights on {t.device}, activations on {device}")


def _check_latency_options(name: str, w: torch.Tensor, tiles: GemmTiles) -> None:
    """wide_loads reads 16-byte runs of codes and prefetch's sector addresses assume them."""
    if (tiles.prefetch or tiles.wide_loads) and (
            w.data_ptr() % 16 or w.stride(0) % 16 or w.stride(1) % 16):
        raise ValueError(f"{name}: prefetch/wide_loads need codes 16-byte aligned with 16-byte "
                         "row strides (K a multiple of 32)")


def compiled(device: torch.device) -> bool:
    """CUDA tensors outside TRITON_INTERPRET: PTX (fast path, PDL) can run."""
    return device.type == "cuda" and not interpret_forced()


def pdl_args(pdl: bool, device: torch.device) -> dict:
    """Programmatic dependent launch (sm_90+): the kernel waits in-kernel for its predecessor."""
    on = pdl and compiled(device)
    return dict(PDL=on, launch_pdl=on)


def _launch_args(tiles: GemmTiles, dtype: torch.dtype, fast: bool, device: torch.device,
                 pdl: bool) -> dict:
    if fast and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the fast (fp16 MMA) path needs fp16/bf16 activations, got {dtype}")
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                SWAP_AB=tiles.swap_ab, IEEE=dtype == torch.float32, FAST=fast,
                EMULATE=not compiled(device),  # the interpreter cannot run PTX
                PREFETCH=tiles.prefetch, WIDE=tiles.wide_loads, SC_AHEAD=tiles.scale_ahead,
                READY=fast and tiles.act_ready, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, **pdl_args(pdl, device),
                **({"maxnreg": tiles.max_regs} if tiles.max_regs and compiled(device) else {}))


def gemm1_swiglu(
    x: torch.Tensor,  # [T, H] activations
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor,  # [E, 2I, H/2] u8, [E, 2I, H/32] u8, [E, 2I]
    plan: RoutingPlan, top_k: int, alpha: float, limit: float, tiles: GemmTiles,
    fast: bool = False, pdl: bool = False,
) -> torch.Tensor:
    """→ act [T·k, I], rows in the plan's expert order: in x's dtype, or fp16 with `fast`
    (|act| ≤ L·(L + 1) = 56 fits fp16, the next GEMM's MMA type)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"gemm1: x must be [T, H] with unit column stride, got {tuple(x.shape)}")
    t, h = x.shape
    e, n2 = w.shape[0], w.shape[1]
    _check_mxfp4("gemm1", w, s, b, n2, h, e, x.device)
    _check_latency_options("gemm1", w, tiles)
    if n2 % 2 or plan.pos.shape[0] != t * top_k:
        raise ValueError(f"gemm1: 2I = {n2} must be even and the plan must hold T·k = {t * top_k}")
    if tiles.split_k != 1:
        raise ValueError("gemm1: swiglu needs whole sums, split_k must be 1")
    inter = n2 // 2
    out = torch.empty(t * top_k, inter, dtype=torch.float16 if fast else x.dtype, device=x.device)
    if t == 0:
        return out
    ready = fast and tiles.act_ready
    xa = x_ready(x, inter) if ready else x
    grid = (plan.max_tiles * triton.cdiv(n2, tiles.block_n),)
    jit["_gemm1_swiglu_kernel"][grid](
        xa, xa.stride(0), w, w.stride(0), w.stride(1), s, s.stride(0), s.stride(1), s.stride(2),
        b, b.stride(0),
        plan.sorted_pair, plan.tile_expert, plan.tile_start, plan.tile_end, out, out.stride(0),
        n2, h, plan.max_tiles, float(alpha), float(limit),
        TOPK=top_k, BLOCK_M=plan.block_m, **_launch_args(tiles, x.dtype, fast, x.device, pdl),
        **({"RND_BF16": x.dtype == torch.bfloat16} if ready else {}),
    )
    return out


def x_ready(x: torch.Tensor, inter: int) -> torch.Tensor:
    """x [T, H] → fp16 [T, H] with each 32-group of columns in the fast path's MMA order
    (GemmTiles.act_ready; kernels/moe_gemm_ready.py). inter: GEMM 1's outputs, which it then
    stores in the same order, so both H and I must be whole 32-groups."""
    t, h = x.shape
    if h % 32 or inter % 32:
        raise ValueError(f"act_ready needs H and I multiples of 32, got H = {h}, I = {inter}")
    xr = torch.empty(t, h, dtype=torch.float16, device=x.device)
    block_t, block_h = 8, 256
    jit["_x_ready_kernel"][(triton.cdiv(t, block_t), triton.cdiv(h, block_h))](
        x, x.stride(0), xr, xr.stride(0), t, h, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return xr


def gemm2_scale(
    act: torch.Tensor,  # [T·k, I] rows in expert order
    w: torch.Tensor, s: torch.Tensor, b: torch.Tensor,  # [E, H, I/2] u8, [E, H, I/32] u8, [E, H]
    plan: RoutingPlan, tiles: GemmTiles, fast: bool = False, out_dtype: torch.dtype | None = None,
    combine_into: torch.Tensor | None = None, counters: torch.Tensor | None = None,
    top_k: int = 1, pdl: bool = False,
) -> torch.Tensor:
    """→ y [S, T·k, H] (S = tiles.split_k): each row's expert output times its router weight.
    S = 1: in out_dtype (default act's), the matmul rounded to it before the bias as in the
    reference; S > 1: fp32 partial sums over K/S each (the bias in the first).
    combine_into [T, H] (with `counters`, ≥ ⌈H/block_n⌉ zeroed int32 that the kernel leaves
    zeroed): also writes combine()'s result there, from the last program of each N block."""
    if act.dim() != 2 or act.stride(1) != 1 or act.shape[0] != plan.pos.shape[0]:
        raise ValueError(f"gemm2: act must be [T·k, I] (unit column stride), got {tuple(act.shape)}")
    rows, inter = act.shape
    e, h = w.shape[0], w.shape[1]
    _check_mxfp4("gemm2", w, s, b, h, inter, e, act.device)
    _check_latency_options("gemm2", w, tiles)
    split = tiles.split_k
    if fast and tiles.act_ready and inter % 32:
        raise ValueError(f"gemm2: act_ready needs I a multiple of 32, got {inter}")
    dtype = (out_dtype or act.dtype) if split == 1 else torch.float32
    out = torch.empty(split, rows, h, dtype=dtype, device=act.device)
    if rows == 0:
        return out
    n_blocks = triton.cdiv(h, tiles.block_n)
    fuse = combine_into is not None
    if fuse:
        t = rows // top_k
        if combine_into.shape != (t, h) or combine_into.stride(1) != 1:
            raise ValueError(f"gemm2: combine_into must be [{t}, {h}], got "
                             f"{tuple(combine_into.shape)}")
        if counters is None or counters.dtype != torch.int32 or counters.numel() < n_blocks:
            raise ValueError(f"gemm2: fusing the combine needs ≥ {n_blocks} int32 counters")
    final = combine_into if fuse else out
    cnt = counters if fuse else plan.num_tiles
    grid = (plan.max_tiles * n_blocks * split,)
    jit["_gemm2_scale_kernel"][grid](
        act, act.stride(0), w, w.stride(0), w.stride(1), s, s.stride(0), s.stride(1),
        s.stride(2), b, b.stride(0), plan.weights, plan.sorted_pair, plan.tile_expert, plan.tile_start,
        plan.tile_end, out, out.stride(0), out.stride(1), h, inter, plan.max_tiles,
        plan.pos, plan.num_tiles, cnt, final, final.stride(-2), rows // top_k, rows,
        BLOCK_M=plan.block_m, SPLIT_K=split, FUSE_COMBINE=fuse, TOPK=top_k,
        COMBINE_T=min(16, triton.next_power_of_2(max(1, rows // top_k))),
        **_launch_args(tiles, act.dtype, fast, act.device, pdl),
    )
    return out


def combine(y: torch.Tensor, plan: RoutingPlan, top_k: int,
            out_dtype: torch.dtype | None = None, pdl: bool = False) -> torch.Tensor:
    """y [S, T·k, H] in expert order → [T, H] (out_dtype, default y's): each token's k·S rows
    summed in fp32."""
    split, rows, h = y.shape
    t = rows // top_k
    out = torch.empty(t, h, dtype=out_dtype or y.dtype, device=y.device)
    if t == 0:
        return out
    block_t = 4 if t >= 4 else 1
    block_h = min(1024 // block_t, triton.next_power_of_2(h))
    jit["_combine_kernel"][(triton.cdiv(t, block_t), triton.cdiv(h, block_h))](
        y, y.stride(0), y.stride(1), plan.pos, out, out.stride(0), t, h, TOPK=top_k,
        SPLIT_K=split, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4, **pdl_args(pdl, y.device),
    )
    return out
