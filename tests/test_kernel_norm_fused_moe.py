"""The MLP norm fused into the MoE block's router (kernels/moe_router.route_fused with a
NormPrologue, kernels/moe.moe_forward_norm), interpreted on the CPU in float32/float16: the same
plan, pre-split x, normed x and new residual as kernels.rmsnorm.rmsnorm then the unfused router,
and the same block output as rmsnorm then moe_forward whether or not the fused path is taken.
"""

from __future__ import annotations

import pytest
import torch

import kernels.moe as moe
from kernels.moe import moe_forward, moe_forward_norm, prepare_moe
from kernels.moe_configs import GEMV_FAST
from kernels.moe_gemm import GemmTiles
from kernels.moe_router import NORM_MAX_TOKENS, norm_fits, route_fused
from kernels.norm_prologue import NormPrologue, norm_prologue
from kernels.rmsnorm import rmsnorm
from runtime.config import ModelConfig
from runtime.synthetic import random_layer

EPS = 1e-5
FIELDS = ("weights", "experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start",
          "tile_end", "num_tiles")
FUSED_ROUTER = moe.MoEConfig(16, GemmTiles(32, 64, swap_ab=True),
                             GemmTiles(32, 64, swap_ab=True), fuse_combine=True,
                             fused_router=True)


def tiny(hidden: int, experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
        experts_per_token=top_k,
    )


def stream(t: int, h: int, dtype: torch.dtype, seed: int, residual: bool = True):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    r = (10 * torch.randn(t, h, generator=g)).to(dtype) if residual else None
    return x, r, 0.5 + torch.rand(h, generator=g)


@pytest.mark.parametrize(
    ("tokens", "experts", "hidden", "dtype", "residual"),
    [
        (1, 32, 96, torch.float32, True),  # one decode token, 20b-like router
        (3, 6, 64, torch.float16, True),  # E not a multiple of the expert block
        (8, 32, 80, torch.float32, True),  # H not a multiple of the H block
        (5, 128, 64, torch.float16, False),  # the first layer: no residual
        (4, 32, 90, torch.float32, True),  # the last hidden slices partly or wholly past H
    ],
)
def test_fused_router_with_norm_is_rmsnorm_then_the_router(
    tokens: int, experts: int, hidden: int, dtype: torch.dtype, residual: bool
) -> None:
    x, r, scale = stream(tokens, hidden, dtype, seed=tokens * experts, residual=residual)
    g = torch.Generator().manual_seed(hidden)
    w = (torch.randn(experts, hidden, generator=g) * 0.3).to(dtype)
    b = torch.randn(experts, generator=g).to(dtype)
    r_before = None if r is None else r.clone()
    h, s = rmsnorm(x, scale, EPS, r)
    want = route_fused(h, w, b, 4, 16, torch.zeros(1, dtype=torch.int32))
    norm = norm_prologue(x, r, scale, EPS)
    y = torch.full_like(x, float("nan"))  # every element must be written
    xs_dtype = torch.float32 if hidden % 32 == 0 else None
    xs = None if xs_dtype is None else torch.full(x.shape, float("nan"), dtype=xs_dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    got = route_fused(x, w, b, 4, 16, counter, xs, norm=norm, y_out=y)
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(y, h) and torch.equal(norm.new_residual(x), s)
    if r is not None:
        assert torch.equal(r, r_before)
    if xs is not None:
        want_xs = torch.empty_like(xs)
        route_fused(h, w, b, 4, 16, torch.zeros(1, dtype=torch.int32), want_xs)
        assert torch.equal(xs, want_xs)
    assert counter.item() == 0


def test_fused_router_with_norm_needs_a_normed_x_buffer() -> None:
    x, r, scale = stream(2, 64, torch.float32, seed=0)
    args = (x, torch.randn(8, 64), torch.randn(8), 2, 16, torch.zeros(1, dtype=torch.int32))
    norm = NormPrologue(scale, EPS, r, torch.empty_like(r))
    for bad in (None, torch.empty(2, 32), torch.empty(2, 64, dtype=torch.float16), x, r):
        with pytest.raises(ValueError, match="y_out"):
            route_fused(*args, norm=norm, y_out=bad)


def test_norm_fits_decode_batches_only() -> None:
    assert norm_fits(1, 4, 32) and norm_fits(NORM_MAX_TOKENS, 4, 128)
    assert not norm_fits(NORM_MAX_TOKENS + 1, 4, 32) and not norm_fits(0, 4, 32)


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k", "dtype", "moe_config", "residual"),
    [
        (1, 64, 4, 2, torch.float32, GEMV_FAST, True),  # GEMV reads the router's pre-split x
        (3, 96, 4, 2, torch.float16, GEMV_FAST, True),
        (2, 64, 4, 2, torch.float32, FUSED_ROUTER, True),  # the tiles read the normed x itself
        (5, 64, 4, 2, torch.float16, FUSED_ROUTER, False),
        (12, 64, 4, 2, torch.float32, FUSED_ROUTER, True),  # past NORM_MAX_TOKENS: rmsnorm
        (3, 64, 4, 2, torch.float32, moe.DECODE, True),  # no fused router: rmsnorm
    ],
)
def test_moe_forward_norm_is_rmsnorm_then_moe_forward(
    tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype,
    moe_config: moe.MoEConfig, residual: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tiny(hidden, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens, dtype=dtype)
    p = prepare_moe(layer)
    x, r, scale = stream(tokens, hidden, dtype, seed=tokens + hidden, residual=residual)
    h, s = rmsnorm(x, scale, EPS, r)
    want = moe_forward(h, layer, cfg, p, moe_config)
    fused_calls = []
    real_route = moe.route_fused

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fused_calls.append(kwargs.get("norm") is not None)
        return real_route(*args, **kwargs)

    monkeypatch.setattr(moe, "route_fused", spy)
    got, new_residual = moe_forward_norm(x, r, scale, EPS, layer, cfg, p, moe_config)
    assert torch.equal(got, want) and torch.equal(new_residual, s)
    if r is None:
        assert new_residual is x
    fuses = moe_config.fused_router and tokens <= NORM_MAX_TOKENS
    assert fused_calls == ([True] if fuses else [False] if moe_config.fused_router else [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", [32, 128])
@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_gpu_moe_forward_norm_at_gpt_oss_shapes(tokens: int, experts: int) -> None:
    """bf16, hidden 2880, k = 4, the default decode config: the new residual exact, the fused
    router's normed x within an ulp of the standalone norm's (compiled, the sums of squares
    may be ordered differently), the block output close to rmsnorm then moe_forward, and the
    same call in a CUDA graph replaying its eager result."""
    cfg = ModelConfig(num_hidden_layers=1, num_experts=experts)
    layer = random_layer(cfg, 0, seed=tokens, device="cuda", dtype=torch.bfloat16)
    p = prepare_moe(layer)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    r = (10 * torch.randn(tokens, cfg.hidden_size, device="cuda")).to(torch.bfloat16)
    scale = layer.mlp_norm
    h, s = rmsnorm(x, scale, EPS, r)
    want = moe_forward(h, layer, cfg, p)
    got, new_residual = moe_forward_norm(x, r, scale, EPS, layer, cfg, p)
    assert torch.equal(new_residual, s)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, f"relative error {err:.2e}"  # a near-tied top-k may flip on an ulp
    out = torch.empty_like(got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = moe_forward_norm(x, r, scale, EPS, layer, cfg, p)
        out.copy_(o)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)
