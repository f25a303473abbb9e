"""Router and routing in one launch, for decode batches (few tokens).

    logits[t, e] = round(Σ_h x[t, h]·Wg[e, h] + bg[e])    fp32 sums, rounded to x's dtype as
                                                           torch's linear is in moe_ref
    plan         = route(logits)                           kernels/moe_routing.py
Each of ⌈E / E_BLOCK⌉ programs computes the logits of E_BLOCK experts for every token (the
router weight, E·H·2 bytes, is read once, spread over the GPU), writes them, and bumps an
arrival counter; the last program to arrive routes the whole batch (one token block) and
resets the counter for the next launch. This replaces a cuBLAS GEMV plus the routing launch.
Only for T ≤ 64 with routing in one token block (decode); otherwise use torch's linear and
moe_routing.route. (cuBLAS takes ≈6 µs for this GEMV alone on an H100.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet
from kernels.moe_routing import (  # noqa: F401 - the kernel calls them
    RouteLaunch,
    RoutingPlan,
    _place_block,
    _route_block,
    _write_tiles,
    new_plan,
    plan_outputs,
)

jit = KernelSet(globals())
for _helper in (_place_block, _route_block, _write_tiles):
    jit(_helper)

E_BLOCK = 4  # experts per program: 8 programs for E = 32, 32 for E = 128
MAX_TOKENS = 64  # the token tile: [T_PAD, E_BLOCK, BLOCK_H] products in registers


@jit(do_not_specialize=("T", "MAX_TILES"))
def _router_kernel(
    X, stride_x, WG, BG, LOGITS, T, H, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START,
    TILE_END, NUM_TILES, MAX_TILES, COUNTER,
    T_PAD: tl.constexpr, E_BLK: tl.constexpr, BLOCK_H: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, FUSED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.arange(0, T_PAD)
    tm = t < T
    e = pid * E_BLK + tl.arange(0, E_BLK)
    em = e < E
    acc = tl.zeros([T_PAD, E_BLK], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < H
        x = tl.load(X + t.to(tl.int64)[:, None] * stride_x + h[None, :],
                    mask=tm[:, None] & hm[None, :], other=0.0).to(tl.float32)  # [T_PAD, BH]
        w = tl.load(WG + e.to(tl.int64)[:, None] * H + h[None, :],
                    mask=em[:, None] & hm[None, :], other=0.0).to(tl.float32)  # [E_BLK, BH]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    logit = acc + tl.load(BG + e, mask=em, other=0.0).to(tl.float32)[None, :]
    tl.store(LOGITS + t[:, None] * E + e[None, :], logit.to(LOGITS.dtype.element_ty),
             mask=tm[:, None] & em[None, :])
    tl.debug_barrier()  # every thread's logits precede the release below
    done = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:  # the last program routes the batch
        tl.debug_barrier()
        _route_block(
            0, LOGITS, E, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END,
            NUM_TILES, MAX_TILES, K, K_PAD, E_PAD, BLOCK_T, CHUNK, BLOCK_M, BLOCK_I, FUSED,
        )
        tl.store(COUNTER, 0)


def fits(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether route_fused can take this batch (one token block, ≤ MAX_TOKENS tokens)."""
    return 0 < tokens <= MAX_TOKENS and RouteLaunch.of(tokens, num_experts, top_k, 1).nblocks == 1


def route_fused(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    gate_bias: torch.Tensor,  # [E]
    top_k: int,
    block_m: int,
    counter: torch.Tensor,  # [1] int32, zero; left at zero
) -> RoutingPlan:
    """route(F.linear(x, Wg, bg), top_k, block_m) in one launch (see fits())."""
    t, h = x.shape
    e = gate_weight.shape[0]
    if gate_weight.shape != (e, h) or gate_bias.shape != (e,) or x.stride(1) != 1:
        raise ValueError(f"route_fused: x {tuple(x.shape)}, gate {tuple(gate_weight.shape)}, "
                         f"bias {tuple(gate_bias.shape)} do not fit (x rows contiguous)")
    if not gate_weight.is_contiguous() or counter.dtype != torch.int32 or counter.numel() < 1:
        raise ValueError("route_fused: contiguous gate weight and an int32 counter needed")
    if not fits(t, top_k, e):
        raise ValueError(f"route_fused: {t} tokens × k={top_k} × E={e} do not fit one block")
    plan = new_plan(t, e, top_k, block_m, x.device)
    lc = RouteLaunch.of(t, e, top_k, plan.max_tiles)
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
    hist = torch.empty(1, lc.e_pad, dtype=torch.int32, device=x.device)
    t_pad = triton.next_power_of_2(t)
    jit["_router_kernel"][(triton.cdiv(e, E_BLOCK),)](
        x, x.stride(0), gate_weight, gate_bias, logits, t, h, e, plan.experts, plan.weights,
        hist, *plan_outputs(plan), plan.max_tiles, counter,
        # the [T, E_BLOCK, BLOCK_H] products stay at 8K elements (64 registers a thread)
        T_PAD=t_pad, E_BLK=E_BLOCK, BLOCK_H=min(512, 8192 // (t_pad * E_BLOCK)),
        **lc.constexprs(top_k, block_m), num_warps=4,
    )
    return plan


__all__ = ["E_BLOCK", "MAX_TOKENS", "fits", "route_fused"]
