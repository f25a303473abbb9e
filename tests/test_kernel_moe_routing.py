"""MoE routing kernel (kernels/moe_routing.py) on the CPU, interpreted, against the torch oracle.

CPU tensors make kernels/jit.py run the kernels in Triton's interpreter, whatever else this pytest
process imported first.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe_ref import route_ref
from kernels.moe_routing import RoutingPlan, max_tiles, route, route_plan_ref

FIELDS = ("experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start", "tile_end",
          "num_tiles")


def assert_same_plan(got: RoutingPlan, want: RoutingPlan) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.long(), b.long()), f"{name}: {a.tolist()} != {b.tolist()}"
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-6, atol=1e-7)


def assert_consistent(plan: RoutingPlan, tokens: int, top_k: int, num_experts: int) -> None:
    """What the GEMMs rely on: the tiles cover every row once, each row of its tile's expert."""
    flat = plan.experts.long().reshape(-1)
    order = plan.sorted_pair.long()
    assert sorted(order.tolist()) == list(range(tokens * top_k))
    assert torch.equal(plan.pos.long()[order], torch.arange(tokens * top_k))
    assert plan.counts.tolist() == torch.bincount(flat, minlength=num_experts).tolist()
    covered = torch.zeros(tokens * top_k, dtype=torch.long)
    for e, s, n in zip(plan.tile_expert.tolist(), plan.tile_start.tolist(),
                       plan.tile_end.tolist(), strict=True):
        if e < 0:
            continue
        assert 0 < n - s <= plan.block_m
        assert (flat[order[s:n]] == e).all()
        covered[s:n] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k", "block_m"),
    [
        (1, 4, 1, 16),  # single decode token, k = 1
        (5, 4, 4, 16),  # k = E: every token hits every expert
        (37, 32, 4, 16),  # 20b-like routing, counts not multiples of the tile
        (70, 128, 4, 16),  # E = 128: several token blocks (two launches)
        (300, 128, 4, 64),
        (29, 128, 3, 32),  # k not a power of two
        (200, 32, 1, 128),
    ],
)
def test_route_matches_torch_topk_softmax_and_a_stable_sort(
    tokens: int, num_experts: int, top_k: int, block_m: int
) -> None:
    g = torch.Generator().manual_seed(tokens * 1000 + num_experts)
    logits = torch.randn(tokens, num_experts, generator=g)  # fp32: no ties
    plan = route(logits, top_k, block_m)
    assert_same_plan(plan, route_plan_ref(logits, top_k, block_m))
    assert_consistent(plan, tokens, top_k, num_experts)
    weights, experts = route_ref(logits, torch.eye(num_experts), torch.zeros(num_experts), top_k)
    assert torch.equal(plan.experts.long(), experts)
    torch.testing.assert_close(plan.weights, weights)
    assert plan.max_tiles == max_tiles(tokens, top_k, num_experts, block_m)


def test_every_token_on_one_expert_and_the_others_empty() -> None:
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    logits[:, 5] += 100.0
    plan = route(logits, 1, 16)
    assert plan.counts.tolist() == [0, 0, 0, 0, 0, 50, 0, 0]
    live = plan.tile_expert[plan.tile_expert >= 0]
    assert live.tolist() == [5, 5, 5, 5]  # ⌈50 / 16⌉ tiles, all of expert 5
    assert plan.tile_end[:4].tolist() == [16, 32, 48, 50]
    assert torch.equal(plan.sorted_pair.long(), torch.arange(50))  # stable: token order kept
    assert torch.allclose(plan.weights, torch.ones(50, 1))
    assert_consistent(plan, 50, 1, 8)


def test_fp16_logits_and_equal_logits_prefer_the_lower_expert_id() -> None:
    logits = torch.zeros(3, 6, dtype=torch.float16)
    logits[1, 4] = 1.0
    plan = route(logits, 2, 16)
    assert plan.experts.tolist() == [[0, 1], [4, 0], [0, 1]]
    assert torch.allclose(plan.weights[0], torch.tensor([0.5, 0.5]))


def test_no_tokens_gives_empty_plan() -> None:
    plan = route(torch.empty(0, 16), 4, 16)
    assert plan.counts.tolist() == [0] * 16
    assert plan.pos.numel() == 0 and plan.max_tiles == 0


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(2, 4), 5, 16)
    with pytest.raises(ValueError, match="power of two"):
        route(torch.randn(2, 4), 2, 24)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.randn(2, 4, 1), 2, 16)
