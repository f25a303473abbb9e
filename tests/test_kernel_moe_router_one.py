"""route_fused's one-token path (fast_one=True, kernels/moe_router_one.py), interpreted on the
CPU: bit for bit the plan of the default path (experts, tie-breaking, weight bits, positions,
tile table), with and without the pre-split x and the norm prologue, and the counter reset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.moe_configs import GEMV_FAST, candidates
from kernels.moe_router import route_fused
from kernels.norm_prologue import norm_prologue

PLAN = ("weights", "experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start",
        "tile_end", "num_tiles")


def _inputs(experts: int, hidden: int, seed: int, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, hidden, generator=g).to(dtype)
    w = (torch.randn(experts, hidden, generator=g) * 0.3).to(dtype)
    b = torch.randn(experts, generator=g).to(dtype)
    return x, w, b


def _both(*args: object, block_m: int = 16, **kw: object) -> tuple[object, object]:
    """(default plan, fast plan) of the same launch, each with its own zeroed counter."""
    x, w, b, k = args
    plans = []
    for fast in (False, True):
        counter = torch.zeros(1, dtype=torch.int32)
        plans.append(route_fused(x, w, b, k, block_m, counter, fast_one=fast, **kw))
        assert counter.item() == 0  # left ready for the next launch
    return plans[0], plans[1]


def _assert_same(want: object, got: object) -> None:
    for name in PLAN:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32)), name


@pytest.mark.parametrize("experts", [4, 8, 32, 128])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_one_token_plan_is_the_default_plan_bit_for_bit(experts: int, top_k: int) -> None:
    x, w, b = _inputs(experts, 64, experts * 10 + top_k)
    want, got = _both(x, w, b, top_k)
    _assert_same(want, got)
    assert got.experts.unique().numel() == top_k  # a real routing, not a degenerate one


@pytest.mark.parametrize(("experts", "top_k"), [(8, 4), (32, 4), (128, 2)])
def test_equal_logits_pick_the_lower_expert_ids_as_the_default_does(
    experts: int, top_k: int
) -> None:
    x = torch.ones(1, 32)
    w = torch.zeros(experts, 32)  # every logit is its bias: ties everywhere
    b = torch.zeros(experts)
    b[[1, 3, experts - 1]] = 2.0  # three-way tie for first, the rest tied at zero
    want, got = _both(x, w, b, top_k)
    _assert_same(want, got)
    assert got.experts[0, :3].tolist()[: min(3, top_k)] == [1, 3, experts - 1][:top_k]


@pytest.mark.parametrize("block_m", [1, 2, 16])
def test_nan_logits_give_the_default_plan_with_repeated_experts(block_m: int) -> None:
    x, w, b = _inputs(8, 32, 7)
    b[2] = float("nan")  # the default maps NaN rows to expert E − 1, possibly repeatedly
    want, got = _both(x, w, b, 4, block_m=block_m)
    for name in PLAN[1:]:
        assert torch.equal(getattr(want, name), getattr(got, name)), name
    assert torch.equal(want.weights.isnan(), got.weights.isnan())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_token_plan_with_the_pre_split_x_and_the_norm_prologue(dtype: torch.dtype) -> None:
    x, w, b = _inputs(32, 64, 3, torch.float16)
    outs = []
    for fast in (False, True):
        xs = torch.full((1, 64), float("nan"), dtype=dtype)
        res = torch.randn(1, 64, generator=torch.Generator().manual_seed(5)).half()
        norm = norm_prologue(x, res, torch.linspace(0.5, 1.5, 64), 1e-5)
        y = torch.empty_like(x)
        counter = torch.zeros(1, dtype=torch.int32)
        plan = route_fused(x, w, b, 4, 16, counter, xs_out=xs, norm=norm, y_out=y,
                           fast_one=fast)
        assert counter.item() == 0
        outs.append((plan, xs, y, norm.new_residual(x)))
    _assert_same(outs[0][0], outs[1][0])
    for a, c in zip(outs[0][1:], outs[1][1:], strict=True):
        assert torch.equal(a, c)


def test_more_tokens_ignore_the_flag() -> None:
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(3, 64, generator=g), torch.randn(8, 64, generator=g), torch.zeros(8)
    want, got = _both(x, w, b, 2)
    _assert_same(want, got)


def test_the_flag_is_opt_in_and_swept_at_one_token() -> None:
    assert not GEMV_FAST.router_fast_one
    sweep = candidates(1, 4, 32)
    assert sweep["g7_n32k256f32fr1"] == dataclasses.replace(GEMV_FAST, router_fast_one=True)
