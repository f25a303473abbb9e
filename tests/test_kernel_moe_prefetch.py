"""The MoE GEMMs' latency options (GemmTiles.prefetch / wide_loads / num_stages, the configs of
kernels/moe_configs_latency.py), interpreted on the CPU, against plain torch on dequantized
weights and against the same tiles without the options (same sums in the same order: same bits).

On the CPU the L2 prefetch itself is a no-op (PTX); what runs is its index arithmetic around the
loop (steps clamped to the last whole block, a prologue only when there is one) and, with
wide_loads, the 16-byte code path, which changes how every code byte reaches the dequantization.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.moe import groups_major
from kernels.moe_configs_latency import LATENCY_CANDIDATES
from kernels.moe_gemm import GemmTiles, gemm1_swiglu, gemm2_scale
from kernels.moe_ref import swiglu_ref
from tests.test_kernel_moe_gemm import case, dense, random_mxfp4

PLAIN = GemmTiles(64, 64, swap_ab=True, group_m=2)  # 64-row blocks: H, 2I leave partial ones
OPTIONS = [
    dict(prefetch=1),
    dict(prefetch=3, wide_loads=True),
    dict(prefetch=2, wide_loads=True, num_stages=2),
    dict(wide_loads=True, num_stages=1),
]


def opts_id(o: dict) -> str:
    return "-".join(f"{k}{int(v)}" for k, v in o.items())


def gemm1_want(x, codes, scales, bias, plan, top_k):
    w = dense(codes, scales).to(x.dtype)
    pair = plan.sorted_pair.long()
    e = plan.experts.reshape(-1).long()[pair]
    h = torch.einsum("rk,rnk->rn", x[pair // top_k].float(), w[e].float()).to(x.dtype).float()
    return swiglu_ref(h + bias[e]).to(x.dtype)


def gemm2_want(act, codes, scales, bias, plan):
    w = dense(codes, scales).to(act.dtype)
    pair = plan.sorted_pair.long()
    e = plan.experts.reshape(-1).long()[pair]
    rw = plan.weights.reshape(-1)[pair]
    want = torch.einsum("rk,rnk->rn", act.float(), w[e].float()).to(act.dtype).float() + bias[e]
    return (want * rw[:, None]).to(act.dtype)


TOL = {torch.float32: dict(rtol=0, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("opts", OPTIONS, ids=opts_id)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "dtype", "fast", "hot"),
    [
        (9, 4, 2, 96, 96, torch.float32, False, None),  # K = 96: one whole step and a tail
        (7, 4, 1, 224, 160, torch.float16, True, None),  # k = 1; K = 224, 160: steps + tails
        (6, 128, 4, 64, 32, torch.float16, True, None),  # E = 128: most experts empty
        (11, 8, 4, 32, 64, torch.float16, True, 3),  # one hot expert; K = 32: no whole step
    ],
)
def test_latency_options_match_the_reference_and_the_plain_tiles_bit_for_bit(
    opts: dict, tokens: int, experts: int, top_k: int, hidden: int, inter: int,
    dtype: torch.dtype, fast: bool, hot: int | None,
) -> None:
    g, plan = case(tokens, experts, top_k, 16, seed=tokens * hidden + inter, hot=hot)
    tiles = replace(PLAIN, **opts)
    w1, s1 = random_mxfp4(g, experts, 2 * inter, hidden)
    b1 = torch.randn(experts, 2 * inter, generator=g)
    w2, s2 = random_mxfp4(g, experts, hidden, inter)
    b2 = torch.randn(experts, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)

    act = gemm1_swiglu(x, w1, groups_major(s1), b1, plan, top_k, 1.702, 7.0, tiles, fast)
    plain = gemm1_swiglu(x, w1, groups_major(s1), b1, plan, top_k, 1.702, 7.0, PLAIN, fast)
    assert torch.equal(act, plain)
    want = gemm1_want(x, w1, s1, b1, plan, top_k)
    torch.testing.assert_close(act.to(dtype), want, **TOL[dtype])

    a2 = act.to(dtype)
    y = gemm2_scale(a2, w2, groups_major(s2), b2, plan, tiles, fast, dtype)[0]
    assert torch.equal(y, gemm2_scale(a2, w2, groups_major(s2), b2, plan, PLAIN, fast, dtype)[0])
    # the checkpoint's row-major exponents (the other prefetch pattern) give the same bits
    assert torch.equal(y, gemm2_scale(a2, w2, s2, b2, plan, tiles, fast, dtype)[0])
    torch.testing.assert_close(y, gemm2_want(a2, w2, s2, b2, plan), **TOL[dtype])


def test_split_k_with_prefetch_sums_every_split_once() -> None:
    """GEMM 2's K splits each prefetch within their own range (the last split may be short or
    even empty)."""
    tokens, experts, top_k, hidden, inter = 13, 4, 2, 48, 160
    g, plan = case(tokens, experts, top_k, 16, seed=11)
    codes, scales = random_mxfp4(g, experts, hidden, inter)
    bias = torch.randn(experts, hidden, generator=g)
    act = torch.randn(tokens * top_k, inter, generator=g).to(torch.float16)
    tiles = GemmTiles(16, 64, swap_ab=True, split_k=3, prefetch=2, wide_loads=True)
    ys = gemm2_scale(act, codes, scales, bias, plan, tiles, True)
    plain = gemm2_scale(act, codes, scales, bias, plan, replace(tiles, prefetch=0,
                                                                 wide_loads=False), True)
    assert torch.equal(ys, plain)
    torch.testing.assert_close(ys.sum(0).to(torch.float16),
                               gemm2_want(act, codes, scales, bias, plan), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", list(LATENCY_CANDIDATES))
def test_every_latency_candidate_runs_both_gemms_correctly(name: str) -> None:
    """Each candidate's own tiles (128-row blocks, its block_m) at a small shape with a partial
    N block and a K tail, on the fast path's emulation, against the reference."""
    mc = LATENCY_CANDIDATES[name]
    assert mc.gemm1.prefetch or mc.gemm1.wide_loads  # a latency option, else why a candidate
    tokens, experts, top_k, hidden, inter = 5, 4, 2, 160, 96  # 2I = 192: one and a half blocks
    g, plan = case(tokens, experts, top_k, mc.block_m, seed=len(name))
    w1, s1 = random_mxfp4(g, experts, 2 * inter, hidden)
    b1 = torch.randn(experts, 2 * inter, generator=g)
    w2, s2 = random_mxfp4(g, experts, hidden, inter)
    b2 = torch.randn(experts, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(torch.float16)
    act = gemm1_swiglu(x, w1, groups_major(s1), b1, plan, top_k, 1.702, 7.0, mc.gemm1, mc.fast)
    torch.testing.assert_close(act, gemm1_want(x, w1, s1, b1, plan, top_k), rtol=2e-3, atol=2e-3)
    y = gemm2_scale(act, w2, groups_major(s2), b2, plan, mc.gemm2, mc.fast, torch.float16)[0]
    torch.testing.assert_close(y, gemm2_want(act, w2, s2, b2, plan), rtol=2e-3, atol=2e-3)


def test_prefetch_distance_and_alignment_are_checked() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        GemmTiles(32, 64, prefetch=9)
    with pytest.raises(ValueError, match="prefetch"):
        GemmTiles(32, 64, prefetch=-1)
    g, plan = case(4, 4, 2, 16, seed=0)
    codes, scales = random_mxfp4(g, 4, 64, 64)
    shifted = torch.zeros(4 * 64 * 32 + 4, dtype=torch.uint8)[4:].view(4, 64, 32)
    shifted.copy_(codes)
    with pytest.raises(ValueError, match="aligned"):
        gemm1_swiglu(torch.randn(4, 64), shifted, scales, torch.zeros(4, 64), plan, 2, 1.7, 7.0,
                     GemmTiles(32, 64, prefetch=1))
    # without the options the same view is fine
    gemm1_swiglu(torch.randn(4, 64), shifted, scales, torch.zeros(4, 64), plan, 2, 1.7, 7.0,
                 GemmTiles(32, 64))
