"""Router GEMV + routing in one launch (kernels/moe_router.py), interpreted on the CPU: the same
plan as torch's linear followed by moe_routing.route, and its arrival counter left at zero."""

from __future__ import annotations

import pytest
import torch

from kernels.moe_gemv import presplit
from kernels.moe_router import MAX_TOKENS, fits, route_fused
from kernels.moe_routing import route

FIELDS = ("experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start", "tile_end",
          "num_tiles")


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "dtype"),
    [
        (1, 32, 4, 96, torch.float32),  # one decode token of a 20b-like router
        (5, 32, 4, 80, torch.float32),  # H not a multiple of the H block
        (16, 128, 4, 64, torch.float32),  # E = 128, the largest batch it takes
        (3, 6, 2, 64, torch.float16),  # E not a multiple of the expert block
        (7, 128, 1, 32, torch.float32),
        (40, 32, 4, 64, torch.float32),  # several tokens per expert
        (2, 2, 1, 90, torch.float32),  # fewer experts than a program's block
        (4, 32, 4, 90, torch.float32),  # the last hidden slices partly or wholly past H
    ],
)
def test_fused_router_gives_the_plan_of_linear_then_route(
    tokens: int, experts: int, top_k: int, hidden: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(tokens * experts)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(experts, hidden, generator=g) * 0.3).to(dtype)
    b = torch.randn(experts, generator=g).to(dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    got = route_fused(x, w, b, top_k, 16, counter)
    want = route(torch.nn.functional.linear(x, w, b), top_k, 16)
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    assert counter.item() == 0  # ready for the next launch (and CUDA-graph replay)


def test_only_decode_sized_batches_fit() -> None:
    assert fits(1, 4, 32) and fits(MAX_TOKENS, 4, 128)
    assert not fits(MAX_TOKENS + 1, 4, 32) and not fits(0, 4, 32)
    x = torch.randn(MAX_TOKENS + 1, 32)
    with pytest.raises(ValueError, match="do not fit"):
        route_fused(x, torch.randn(8, 32), torch.randn(8), 2, 16, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize(("tokens", "hidden", "dtype"),
                         [(1, 96, torch.float32), (3, 64, torch.float16), (5, 2880, torch.float32)])
def test_fused_router_also_writes_x_pre_split_for_the_gemv(
    tokens: int, hidden: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(tokens, hidden, generator=g).to(torch.float16)
    w, b = torch.randn(32, hidden, generator=g).half(), torch.randn(32, generator=g).half()
    xs = torch.full((tokens, hidden), float("nan"), dtype=dtype)  # every element must be written
    got = route_fused(x, w, b, 4, 16, torch.zeros(1, dtype=torch.int32), xs_out=xs)
    assert torch.equal(xs, presplit(x, dtype))
    want = route_fused(x, w, b, 4, 16, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(got.experts, want.experts) and torch.equal(got.weights, want.weights)


def test_fused_router_rejects_a_pre_split_buffer_that_does_not_fit() -> None:
    x = torch.randn(2, 64)
    args = (x, torch.randn(8, 64), torch.randn(8), 2, 16, torch.zeros(1, dtype=torch.int32))
    for bad in (torch.empty(2, 32), torch.empty(2, 64, dtype=torch.bfloat16),
                torch.empty(64, 2).t()):
        with pytest.raises(ValueError, match="xs_out"):
            route_fused(*args, xs_out=bad)
