"""GemmTiles.scale_ahead (kernels/moe_gemm_ahead.py) and the m_ tiles of
kernels/moe_configs_latency.py, interpreted on the CPU.

scale_ahead loads a k-step's exponents one step early and carries them in registers; the codes,
the dequantization and the sums are those of the plain fast path in the same order, so the
results must be the same bits as the plain tiles' — and within rounding of the torch oracle on
dequantized weights. What can go wrong is which step's exponents a step gets: the first step's
load before the loop, the clamp at the last whole step, a K tail after it (which loads its own),
K shorter than one step (no whole step: the pre-loop load must be masked off), K splits.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.moe import groups_major
from kernels.moe_configs_latency import LATENCY_CANDIDATES
from kernels.moe_gemm import GemmTiles, gemm1_swiglu, gemm2_scale
from tests.test_kernel_moe_gemm import case, random_mxfp4
from tests.test_kernel_moe_prefetch import PLAIN, TOL, gemm1_want, gemm2_want

AHEAD = [
    dict(scale_ahead=True, num_stages=1),  # 4-byte code loads
    dict(scale_ahead=True, wide_loads=True, prefetch=2, num_stages=1),
    dict(scale_ahead=True, wide_loads=True, num_stages=3),  # Triton's cp.async pipeline
]


def opts_id(o: dict) -> str:
    return "-".join(f"{k}{int(v)}" for k, v in o.items())


def layer(tokens: int, experts: int, top_k: int, hidden: int, inter: int, block_m: int,
          seed: int, hot: int | None = None, dtype: torch.dtype = torch.float16):
    g, plan = case(tokens, experts, top_k, block_m, seed=seed, hot=hot)
    w1, s1 = random_mxfp4(g, experts, 2 * inter, hidden)
    b1 = torch.randn(experts, 2 * inter, generator=g)
    w2, s2 = random_mxfp4(g, experts, hidden, inter)
    b2 = torch.randn(experts, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    return plan, x, (w1, s1, b1), (w2, s2, b2)


def run_both(plan, x, l1, l2, top_k: int, t1: GemmTiles, t2: GemmTiles, fast: bool):
    """GEMM 1 then GEMM 2 (exponents groups-major, as prepare_moe stores them)."""
    w1, s1, b1 = l1
    w2, s2, b2 = l2
    act = gemm1_swiglu(x, w1, groups_major(s1), b1, plan, top_k, 1.702, 7.0, t1, fast)
    y = gemm2_scale(act.to(x.dtype), w2, groups_major(s2), b2, plan, t2, fast, x.dtype)[0]
    return act, y


def test_scale_ahead_is_off_by_default() -> None:
    """Today's tiles stay today's code path until the lead switches after measuring."""
    assert GemmTiles(128, 128).scale_ahead is False


@pytest.mark.parametrize("opts", AHEAD, ids=opts_id)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "hot"),
    [
        (7, 4, 1, 224, 160, None),  # k = 1; K = 224, 160: whole steps + a tail; 2I = 320
        (6, 128, 4, 64, 96, None),  # E = 128: most experts empty; GEMM 1 K = one whole step
        (11, 8, 4, 32, 64, 3),  # every token on one expert; GEMM 1 K = 32 < BLOCK_K
    ],
)
def test_scale_ahead_gives_the_plain_tiles_bits_and_the_reference(
    opts: dict, tokens: int, experts: int, top_k: int, hidden: int, inter: int,
    hot: int | None,
) -> None:
    plan, x, l1, l2 = layer(tokens, experts, top_k, hidden, inter, 16, tokens + hidden, hot)
    tiles = replace(PLAIN, **opts)
    act, y = run_both(plan, x, l1, l2, top_k, tiles, tiles, True)
    act_p, y_p = run_both(plan, x, l1, l2, top_k, PLAIN, PLAIN, True)
    assert torch.equal(act, act_p)
    assert torch.equal(y, y_p)
    torch.testing.assert_close(act, gemm1_want(x, *l1, plan, top_k), **TOL[torch.float16])
    torch.testing.assert_close(y, gemm2_want(act, *l2, plan), **TOL[torch.float16])


def test_scale_ahead_with_row_major_exponents_and_many_steps() -> None:
    """The checkpoint's [E, N, G] exponents (stride 1 along groups), 10 whole 32-wide steps and
    exponents spread over 110…134: each step must get its own exponents, not a neighbour's."""
    tokens, experts, top_k, n, k = 9, 4, 2, 48, 320
    g, plan = case(tokens, experts, top_k, 16, seed=5)
    codes, scales = random_mxfp4(g, experts, n, k, lo=110, hi=134)
    bias = torch.randn(experts, n, generator=g)
    act = torch.randn(tokens * top_k, k, generator=g).to(torch.float16)
    tiles = GemmTiles(32, 32, swap_ab=True, num_stages=1, scale_ahead=True)
    y = gemm2_scale(act, codes, scales, bias, plan, tiles, True)[0]
    plain = gemm2_scale(act, codes, scales, bias, plan, replace(tiles, scale_ahead=False), True)
    assert torch.equal(y, plain[0])
    torch.testing.assert_close(y, gemm2_want(act, codes, scales, bias, plan), rtol=4e-3,
                               atol=4e-3)


def test_scale_ahead_with_split_k_sums_every_split_once() -> None:
    """GEMM 2's K splits: each split's first exponents load before its own loop, and the last
    split may be short (or empty: its pre-loop load is masked off)."""
    tokens, experts, top_k, hidden, inter = 13, 4, 2, 48, 160
    g, plan = case(tokens, experts, top_k, 16, seed=11)
    codes, scales = random_mxfp4(g, experts, hidden, inter)
    bias = torch.randn(experts, hidden, generator=g)
    act = torch.randn(tokens * top_k, inter, generator=g).to(torch.float16)
    for split in (2, 3):
        tiles = GemmTiles(16, 64, swap_ab=True, split_k=split, scale_ahead=True, wide_loads=True,
                          prefetch=1, num_stages=1)
        ys = gemm2_scale(act, codes, groups_major(scales), bias, plan, tiles, True)
        plain = gemm2_scale(act, codes, groups_major(scales), bias, plan,
                            GemmTiles(16, 64, swap_ab=True, split_k=split), True)
        assert torch.equal(ys, plain)
        torch.testing.assert_close(ys.sum(0).to(torch.float16),
                                   gemm2_want(act, codes, scales, bias, plan), rtol=2e-3,
                                   atol=2e-3)


def test_scale_ahead_leaves_the_exact_float32_path_alone() -> None:
    """The option belongs to the fast (fp16 MMA) path; fp32 activations take the exact path,
    which must be unchanged (same bits) and still match the reference."""
    plan, x, l1, l2 = layer(9, 4, 2, 96, 96, 16, seed=3, dtype=torch.float32)
    tiles = replace(PLAIN, scale_ahead=True, wide_loads=True, prefetch=2)
    act, y = run_both(plan, x, l1, l2, 2, tiles, tiles, False)
    act_p, y_p = run_both(plan, x, l1, l2, 2, PLAIN, PLAIN, False)
    assert torch.equal(act, act_p) and torch.equal(y, y_p)
    torch.testing.assert_close(act, gemm1_want(x, *l1, plan, 2), **TOL[torch.float32])
    torch.testing.assert_close(y, gemm2_want(act, *l2, plan), **TOL[torch.float32])


M_NAMES = [n for n in LATENCY_CANDIDATES if n.startswith("m_")]


def test_the_m_candidates_exist_and_use_the_option() -> None:
    assert 3 <= len(M_NAMES) <= 6
    for name in M_NAMES:
        mc = LATENCY_CANDIDATES[name]
        assert mc.fast and mc.gemm1.scale_ahead and mc.gemm2.scale_ahead, name


@pytest.mark.parametrize("name", M_NAMES)
def test_m_candidate_at_e128_with_a_hot_expert(name: str) -> None:
    """Each m_ candidate's own tiles at E = 128 (most experts empty) with one hot expert, k = 4,
    partial N blocks (2I = 192, H = 160) and a K tail (H = 160 over k128 steps)."""
    mc = LATENCY_CANDIDATES[name]
    plan, x, l1, l2 = layer(5, 128, 4, 160, 96, mc.block_m, seed=len(name), hot=7)
    act, y = run_both(plan, x, l1, l2, 4, mc.gemm1, mc.gemm2, True)
    torch.testing.assert_close(act, gemm1_want(x, *l1, plan, 4), **TOL[torch.float16])
    torch.testing.assert_close(y, gemm2_want(act, *l2, plan), **TOL[torch.float16])
