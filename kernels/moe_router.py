"""Router and routing in one launch, for decode batches (few tokens).

    logits[t, e] = round(Σ_h x[t, h]·Wg[e, h] + bg[e])    fp32 sums, rounded to x's dtype as
                                                           torch's linear is in moe_ref
    plan         = route(logits)                           kernels/moe_routing.py
Each of ⌈E / E_BLOCK⌉ × H_SPLIT programs computes partial sums of E_BLOCK experts' logits over
one slice of the hidden size for every token (the router weight, E·H·2 bytes, is read once,
spread over the GPU: 48 busy programs of 4 KB each for one token of 20b, where 8 programs
walking all of H were latency bound), writes them, and bumps an arrival counter; the last program to
arrive sums the slices in a fixed order (deterministic), adds the bias, rounds, routes the
whole batch (one token block) and resets the counter for the next launch. This replaces a cuBLAS GEMV plus the routing launch.
Only for T ≤ 64 with routing in one token block (decode); otherwise use torch's linear and
moe_routing.route. (cuBLAS takes ≈6 µs for this GEMV alone on an H100.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.jit import KernelSet
from kernels.moe_router_one import _route_one
from kernels.moe_routing import (  # noqa: F401 - the kernel calls them
    RouteLaunch,
    RoutingPlan,
    _place_block,
    _route_block,
    _write_tiles,
    new_plan,
    plan_outputs,
)
from kernels.norm_prologue import NormPrologue, _norm_inv_rms, _norm_tile, overlap, row_block
from kernels.pdl import wait_then_release

jit = KernelSet(globals())
pdl.register(jit)
for _helper in (_place_block, _route_block, _write_tiles, _norm_inv_rms, _norm_tile,
                _route_one):
    jit(_helper)

E_BLOCK = 4  # experts per program
H_SPLIT = 8  # programs along the hidden size: 64 programs for E = 32, 256 for E = 128
MAX_TOKENS = 64  # the token tile: [T_PAD, E_BLOCK, BLOCK_H] products in registers
# route_fused's norm prologue up to this many tokens (norm_fits); a guess before H100 timings
NORM_MAX_TOKENS = 8


@jit(do_not_specialize=("T", "MAX_TILES"))
def _router_kernel(
    X, stride_x, WG, BG, PART, LOGITS, T, H, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E,
    TILE_START, TILE_END, NUM_TILES, MAX_TILES, COUNTER, XS, stride_xs,
    R, SC, S_OUT, Y_OUT, stride_r, stride_s, stride_y, eps,  # the norm prologue's (NORM)
    T_PAD: tl.constexpr, E_PAD: tl.constexpr, E_BLK: tl.constexpr, BLOCK_H: tl.constexpr,
    H_SPLIT: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, FUSED: tl.constexpr,
    WRITE_XS: tl.constexpr, NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False,
    BLOCK_ROW: tl.constexpr = 1, PDL: tl.constexpr = False, FAST_ONE: tl.constexpr = False,
):
    wait_then_release(PDL)  # kernels/pdl.py: x comes from the predecessor
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.arange(0, T_PAD)
    tm = t < T
    e = pid * E_BLK + tl.arange(0, E_BLK)
    em = e < E
    h_per = tl.cdiv(tl.cdiv(H, BLOCK_H), H_SPLIT) * BLOCK_H  # whole blocks per slice
    h_lo = split * h_per
    acc = tl.zeros([T_PAD, E_BLK], dtype=tl.float32)
    inv = tl.zeros([T_PAD], dtype=tl.float32)
    if NORM:  # every token's inverse rms (s and y are written below, per slice)
        inv = _norm_inv_rms(X, R, S_OUT, stride_x, stride_r, stride_s, T, H, eps, pid < 0,
                            T_PAD, BLOCK_ROW, HAS_RES)
    t64 = t.to(tl.int64)[:, None]
    for h0 in range(h_lo, tl.minimum(h_lo + h_per, H), BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < H
        x = tl.load(X + t64 * stride_x + h[None, :], mask=tm[:, None] & hm[None, :],
                    other=0.0)  # [T_PAD, BH]
        if NORM:  # the first expert block's programs write the new residual and normed x
            mine = tm[:, None] & hm[None, :] & (pid == 0)
            r = x
            if HAS_RES:
                r = tl.load(R + t64 * stride_r + h[None, :], mask=tm[:, None] & hm[None, :],
                            other=0.0)
                s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                tl.store(S_OUT + t64 * stride_s + h[None, :], s, mask=mine)
            sc = tl.load(SC + h, mask=hm, other=0.0)
            x = _norm_tile(x, r, sc[None, :], inv[:, None], HAS_RES)
            tl.store(Y_OUT + t64 * stride_y + h[None, :], x, mask=mine)
        x = x.to(tl.float32)
        if WRITE_XS:  # the GEMV's pre-split x: k = 32g + 2i + j stored at 32g + 16j + i
            pos = h // 32 * 32 + h % 2 * 16 + h % 32 // 2
            tl.store(XS + t.to(tl.int64)[:, None] * stride_xs + pos[None, :],
                     x.to(XS.dtype.element_ty), mask=tm[:, None] & hm[None, :] & (pid == 0))
        w = tl.load(WG + e.to(tl.int64)[:, None] * H + h[None, :],
                    mask=em[:, None] & hm[None, :], other=0.0).to(tl.float32)  # [E_BLK, BH]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    # partial sums [H_SPLIT, T_PAD, E_PAD] fp32 (rows past T hold zeros)
    tl.store(PART + (split * T_PAD + t[:, None]) * E_PAD + e[None, :], acc,
             mask=(e < E_PAD)[None, :])
    tl.debug_barrier()  # every thread's partials precede the release below
    done = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:  # the last program routes
        tl.debug_barrier()
        cols = tl.arange(0, E_PAD)
        logit = tl.zeros([T_PAD, E_PAD], dtype=tl.float32)
        for s in tl.static_range(H_SPLIT):  # fixed order: deterministic
            logit += tl.load(PART + (s * T_PAD + t[:, None]) * E_PAD + cols[None, :],
                             mask=(cols < E)[None, :], other=0.0, volatile=True)
        logit += tl.load(BG + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
        if FAST_ONE:  # T == 1 (T_PAD == 1): the plan from registers (kernels/moe_router_one)
            one = logit.to(LOGITS.dtype.element_ty).to(tl.float32)  # as _route_block reads it
            _route_one(tl.where((cols < E)[None, :], one, float("-inf")), E, IDS, W, POS,
                       SORTED, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, MAX_TILES, K,
                       K_PAD, E_PAD, BLOCK_M)
        else:
            tl.store(LOGITS + t[:, None] * E + cols[None, :],
                     logit.to(LOGITS.dtype.element_ty), mask=tm[:, None] & (cols < E)[None, :])
            tl.debug_barrier()  # the logits are read back by other threads of this program
            _route_block(
                0, LOGITS, E, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START,
                TILE_END, NUM_TILES, MAX_TILES, K, K_PAD, E_PAD, BLOCK_T, CHUNK, BLOCK_M,
                BLOCK_I, FUSED,
            )
        tl.store(COUNTER, 0)


def fits(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether route_fused can take this batch (one token block, ≤ MAX_TOKENS tokens)."""
    return 0 < tokens <= MAX_TOKENS and RouteLaunch.of(tokens, num_experts, top_k, 1).nblocks == 1


def norm_fits(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether route_fused should take this batch with its norm prologue: every program reads
    every token's whole x and residual rows (T·H·4 bytes from L2 for bf16, per program), which
    beyond a few tokens costs more than the standalone norm's launch."""
    return tokens <= NORM_MAX_TOKENS and fits(tokens, top_k, num_experts)


def route_fused(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    gate_bias: torch.Tensor,  # [E]
    top_k: int,
    block_m: int,
    counter: torch.Tensor,  # [1] int32, zero; left at zero
    xs_out: torch.Tensor | None = None,  # [T, H] fp32/fp16: also gets x pre-split (moe_gemv)
    norm: NormPrologue | None = None,  # x is then the un-normed delta (kernels/norm_prologue)
    y_out: torch.Tensor | None = None,  # [T, H] x's dtype: gets the normed x (with norm)
    fast_one: bool = False,  # T == 1: route in registers (kernels/moe_router_one.py)
) -> RoutingPlan:
    """route(F.linear(x, Wg, bg), top_k, block_m) in one launch (see fits()). With xs_out,
    the programs of the first expert block also write x in the MoE GEMV's pre-split layout
    (kernels/moe_gemv.presplit: per 32-group its 16 even k, then its 16 odd k) in xs_out's
    dtype: they read x anyway, and it saves the GEMV path a copy launch (3 µs per layer on the
    H100 at one token).

    With norm (decode batches up to NORM_MAX_TOKENS, see norm_fits), x is the un-normed delta:
    every program computes the tokens' inverse rms first and normalizes x as it loads it, and
    the first expert block's programs also write the new residual stream into norm.resid_out
    and the normed x into y_out (for whatever else reads the MoE's input), so the standalone
    rmsnorm launch before the MoE goes away. Everything downstream, xs_out included, sees
    exactly the bits rmsnorm would have produced (interpreted; compiled, up to the order of the
    sum of squares, kernels/norm_prologue.py).

    fast_one (opt-in, MoEConfig.router_fast_one): a one-token batch's last program writes the
    plan straight from its registers (the same plan, bit for bit); other batch sizes ignore it."""
    t, h = x.shape
    e = gate_weight.shape[0]
    if gate_weight.shape != (e, h) or gate_bias.shape != (e,) or x.stride(1) != 1:
        raise ValueError(f"route_fused: x {tuple(x.shape)}, gate {tuple(gate_weight.shape)}, "
                         f"bias {tuple(gate_bias.shape)} do not fit (x rows contiguous)")
    if not gate_weight.is_contiguous() or counter.dtype != torch.int32 or counter.numel() < 1:
        raise ValueError("route_fused: contiguous gate weight and an int32 counter needed")
    if xs_out is not None and (xs_out.shape != (t, h) or xs_out.stride(1) != 1 or h % 32
                               or xs_out.dtype not in (torch.float32, torch.float16)
                               or xs_out.device != x.device):
        raise ValueError(f"route_fused: xs_out must be fp32/fp16 [{t}, {h}] (H % 32 == 0) with "
                         f"contiguous rows on {x.device}, got {xs_out.dtype} "
                         f"{tuple(xs_out.shape)} strides {xs_out.stride()} on {xs_out.device}")
    if not fits(t, top_k, e):
        raise ValueError(f"route_fused: {t} tokens × k={top_k} × E={e} do not fit one block")
    if norm is not None:
        norm.check(x, "route_fused")
        if (y_out is None or y_out.shape != x.shape or y_out.dtype != x.dtype
                or y_out.stride(1) != 1 or y_out.device != x.device):
            raise ValueError(f"route_fused: with norm, y_out must be {x.dtype} {tuple(x.shape)} "
                             f"with contiguous rows on {x.device}")
        if any(overlap(y_out, t) for t in (x, norm.residual, norm.resid_out) if t is not None):
            raise ValueError("route_fused: y_out must not overlap x or the residuals (other "
                             "programs read them while the first expert block writes y_out)")
    plan = new_plan(t, e, top_k, block_m, x.device)
    lc = RouteLaunch.of(t, e, top_k, plan.max_tiles)
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
    hist = torch.empty(1, lc.e_pad, dtype=torch.int32, device=x.device)
    t_pad = triton.next_power_of_2(t)
    part = torch.empty(H_SPLIT, t_pad, lc.e_pad, dtype=torch.float32, device=x.device)
    bh = block_h(t_pad, h)
    cst = lc.constexprs(top_k, block_m)
    if norm is not None:
        r, sc, s_out, stride_r, stride_s, eps = norm.launch_args(x)
        normed = dict(NORM=True, HAS_RES=norm.residual is not None, BLOCK_ROW=row_block(h))
        norm_args = (r, sc, s_out, y_out, stride_r, stride_s, y_out.stride(0), eps)
    else:
        normed, norm_args = {}, (x, x, x, x, x.stride(0), x.stride(0), x.stride(0), 0.0)
    jit["_router_kernel"][(triton.cdiv(e, E_BLOCK), H_SPLIT)](
        x, x.stride(0), gate_weight, gate_bias, part, logits, t, h, e, plan.experts,
        plan.weights, hist, *plan_outputs(plan), plan.max_tiles, counter,
        xs_out if xs_out is not None else part, xs_out.stride(0) if xs_out is not None else 0,
        *norm_args, T_PAD=t_pad, E_BLK=E_BLOCK, BLOCK_H=bh, H_SPLIT=H_SPLIT,
        **cst, WRITE_XS=xs_out is not None, num_warps=num_warps(t_pad, bh), **normed,
        **pdl.launch_args(x.device), **({"FAST_ONE": True} if fast_one and t == 1 else {}),
    )
    return plan


def block_h(t_pad: int, h: int) -> int:
    """The hidden block of the router's loop. The [T, E_BLOCK, BLOCK_H] products stay at ≤ 8K
    elements (64 registers a thread). One 512-wide block per slice: H = 2880 keeps 6 of the 8
    slices busy, and that measured faster on the H100 than 128-wide blocks over all 8 (one 20b
    token: 42.7 vs 44.6 µs per layer)."""
    return min(triton.next_power_of_2(triton.cdiv(h, H_SPLIT)), 8192 // (t_pad * E_BLOCK))


def num_warps(t_pad: int, bh: int) -> int:
    return 4 if t_pad * E_BLOCK * bh >= 4096 else 2


__all__ = ["E_BLOCK", "H_SPLIT", "MAX_TOKENS", "NORM_MAX_TOKENS", "block_h", "fits", "norm_fits",
           "num_warps", "route_fused"]
