"""MXFP4 grouped GEMMs and the combine (kernels/moe_gemm.py), interpreted on the CPU, against
plain torch on dequantized weights (runtime/mxfp4.py, kernels/moe_ref.py)."""

from __future__ import annotations

import pytest
import torch

from kernels.moe import groups_major
from kernels.moe_gemm import GemmTiles, combine, gemm1_swiglu, gemm2_scale
from kernels.moe_ref import swiglu_ref
from kernels.moe_routing import route_plan_ref
from runtime.mxfp4 import dequantize


def random_mxfp4(g: torch.Generator, e: int, n: int, k: int, lo: int = 118, hi: int = 126
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K/2] codes and [E, N, K/32] exponents spread over [lo, hi]."""
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi + 1, (e, n, k // 32), dtype=torch.uint8, generator=g)
    return codes, scales


def dense(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    e, n, half = codes.shape
    return dequantize(codes.view(e, n, half // 16, 16), scales)  # [E, N, K] fp32


def case(tokens: int, experts: int, top_k: int, block_m: int, seed: int, hot: int | None = None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    if hot is not None:
        logits[:, hot] += 50.0
    return g, route_plan_ref(logits, top_k, block_m)


TILES = [
    GemmTiles(16, 32),
    GemmTiles(32, 64, group_m=2),
    GemmTiles(16, 64, swap_ab=True),
    GemmTiles(64, 128, swap_ab=True, group_m=4),
]
FAST = [False, True]  # True: the PTX dequantization's emulation and its column permutation


def tiles_id(t: GemmTiles) -> str:
    return f"n{t.block_n}k{t.block_k}s{t.swap_ab:d}x{t.split_k}"


@pytest.mark.parametrize("tiles", TILES, ids=tiles_id)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "dtype", "fast"),
    [
        (9, 4, 2, 96, 80, torch.float32, False),  # H, I not multiples of the blocks
        (21, 8, 4, 64, 48, torch.float16, False),
        (21, 8, 4, 96, 48, torch.float16, True),
        (6, 128, 4, 32, 32, torch.float32, False),  # most experts empty
        (6, 128, 4, 32, 48, torch.float16, True),
    ],
)
def test_gemm1_gathers_tokens_and_fuses_bias_and_swiglu(
    tiles: GemmTiles, tokens: int, experts: int, top_k: int, hidden: int, inter: int,
    dtype: torch.dtype, fast: bool,
) -> None:
    g, plan = case(tokens, experts, top_k, 16, seed=tokens + hidden)
    codes, scales = random_mxfp4(g, experts, 2 * inter, hidden)
    bias = torch.randn(experts, 2 * inter, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    act = gemm1_swiglu(x, codes, groups_major(scales), bias, plan, top_k, 1.702, 7.0, tiles, fast)
    w = dense(codes, scales).to(dtype)
    pair = plan.sorted_pair.long()
    e = plan.experts.reshape(-1).long()[pair]
    h = torch.einsum("rk,rnk->rn", x[pair // top_k].float(), w[e].float()).to(dtype).float()
    want = swiglu_ref(h + bias[e]).to(dtype)
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(act, want, **tol)


@pytest.mark.parametrize(
    "tiles", [*TILES, GemmTiles(32, 32, split_k=2), GemmTiles(64, 64, swap_ab=True, split_k=3)],
    ids=tiles_id,
)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "block_m", "dtype", "fast"),
    [
        (9, 4, 2, 80, 96, 16, torch.float32, False),
        (40, 4, 1, 48, 64, 16, torch.float16, False),  # k = 1, several tiles per expert
        (40, 4, 1, 48, 160, 16, torch.float16, True),
        (33, 8, 4, 32, 64, 32, torch.float32, False),
    ],
)
def test_gemm2_scales_by_router_weight_and_combine_sums_each_token(
    tiles: GemmTiles, tokens: int, experts: int, top_k: int, hidden: int, inter: int,
    block_m: int, dtype: torch.dtype, fast: bool,
) -> None:
    g, plan = case(tokens, experts, top_k, block_m, seed=7 * tokens + inter)
    codes, scales = random_mxfp4(g, experts, hidden, inter)
    bias = torch.randn(experts, hidden, generator=g)
    act = torch.randn(tokens * top_k, inter, generator=g).to(dtype)
    ys = gemm2_scale(act, codes, groups_major(scales), bias, plan, tiles, fast)
    # the checkpoint's row-major exponents give the same bits
    assert torch.equal(gemm2_scale(act, codes, scales, bias, plan, tiles, fast), ys)
    assert ys.shape == (tiles.split_k, tokens * top_k, hidden)
    y = ys.sum(0).to(dtype) if tiles.split_k > 1 else ys[0]
    w = dense(codes, scales).to(dtype)
    pair = plan.sorted_pair.long()
    e = plan.experts.reshape(-1).long()[pair]
    rw = plan.weights.reshape(-1)[pair]
    want = torch.einsum("rk,rnk->rn", act.float(), w[e].float()).to(dtype).float() + bias[e]
    want = (want * rw[:, None]).to(dtype)
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, want, **tol)
    out = combine(ys, plan, top_k, dtype)
    summed = ys.float().sum(0)[plan.pos.long()].view(tokens, top_k, hidden).sum(1).to(dtype)
    torch.testing.assert_close(out, summed, rtol=1e-6, atol=1e-5)


def test_every_code_and_scale_is_dequantized_exactly() -> None:
    """One-hot activations pick single weights: the kernel must reproduce mxfp4.dequantize
    bit for bit, over all 16 codes and scale bytes from tiny to large."""
    g = torch.Generator().manual_seed(3)
    experts, hidden, inter = 2, 32, 64
    codes = torch.arange(256, dtype=torch.uint8).repeat(experts * hidden * inter // 512)
    codes = codes.view(experts, hidden, inter // 2)
    scales = torch.tensor([1, 60, 100, 127, 140, 200, 240, 120], dtype=torch.uint8)
    scales = scales.repeat(experts * hidden * inter // 32 // 8).view(experts, hidden, inter // 32)
    tokens = inter  # token t routes to expert t % 2 and carries the one-hot row t
    logits = torch.full((tokens, experts), -1.0)
    logits[torch.arange(tokens), torch.arange(tokens) % experts] = 1.0
    plan = route_plan_ref(logits, 1, 16)
    act = torch.eye(inter)[plan.sorted_pair.long()]  # rows in expert order
    bias = torch.zeros(experts, hidden)
    y = gemm2_scale(act, codes, scales, bias, plan, GemmTiles(16, 32))[0]
    y = y / plan.weights.reshape(-1)[plan.sorted_pair.long()][:, None]
    w = dense(codes, scales)  # [E, H, I]
    tok = plan.sorted_pair.long()
    want = w[tok % experts, :, tok]  # row r: column tok of its expert
    assert torch.equal(y, want)
    del g


def test_shape_and_dtype_mistakes_are_refused() -> None:
    g, plan = case(4, 4, 2, 16, seed=0)
    codes, scales = random_mxfp4(g, 4, 64, 32)
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="bias"):
        gemm1_swiglu(x, codes, scales, torch.zeros(4, 64, dtype=torch.float16), plan, 2, 1.7, 7.0,
                     TILES[0])
    with pytest.raises(ValueError, match="shapes"):
        gemm1_swiglu(torch.randn(4, 64), codes, scales, torch.zeros(4, 64), plan, 2, 1.7, 7.0,
                     TILES[0])
    with pytest.raises(ValueError, match="power of two"):
        GemmTiles(24, 64)


@pytest.mark.parametrize("tiles", [GemmTiles(32, 32), GemmTiles(16, 64, swap_ab=True, split_k=2)],
                         ids=tiles_id)
def test_fused_combine_gives_the_same_bits_and_leaves_its_counters_at_zero(
    tiles: GemmTiles,
) -> None:
    tokens, experts, top_k, hidden, inter = 40, 8, 3, 80, 64  # > 16 tokens: several row blocks
    g, plan = case(tokens, experts, top_k, 16, seed=5)
    codes, scales = random_mxfp4(g, experts, hidden, inter)
    bias = torch.randn(experts, hidden, generator=g)
    act = torch.randn(tokens * top_k, inter, generator=g)
    separate = combine(gemm2_scale(act, codes, scales, bias, plan, tiles), plan, top_k)
    counters = torch.zeros(16, dtype=torch.int32)
    fused = torch.full((tokens, hidden), float("nan"))
    gemm2_scale(act, codes, scales, bias, plan, tiles, combine_into=fused, counters=counters,
                top_k=top_k)
    assert torch.equal(fused, separate)
    assert counters.tolist() == [0] * 16
