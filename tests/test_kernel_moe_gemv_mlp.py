"""The GEMV path's latency options (kernels/moe_gemv_pipe.py) against today's path and the oracle.

CPU, interpreted (the fast steps through their Triton emulation): loads ahead of the math in
registers (prefetch 1/2) or through the cp.async pipeliner (async_copy), and GEMM 2's fused
combine. They move work in time, not in arithmetic: every option must give today's bits.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import MoEConfig, moe_forward, moe_forward_ref, prepare_moe
from kernels.moe_configs_gemv import GEMV2_CANDIDATES, GEMV_WAVE_CANDIDATES
from kernels.moe_gemv import GemvConfig, GemvTiles, moe_gemv
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemv import SMALL_GEMV, TOL, check, tiny

OPTIONS = {
    "prefetch1": dict(prefetch=1),
    "prefetch2": dict(prefetch=2),
    "async": dict(async_copy=True),
}


def gemv(dequant: str, fuse: bool = False, n: int = 32, k: int = 64, **opts: object
         ) -> GemvConfig:
    return GemvConfig(GemvTiles(n, k, dequant=dequant, **opts),
                      GemvTiles(n, k, split_k=2, dequant=dequant, **opts), fuse_combine=fuse)


def as_moe(cfg: GemvConfig) -> MoEConfig:
    return MoEConfig(16, SMALL_GEMV.gemm1, SMALL_GEMV.gemm2, gemv=cfg)


def routed(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return ids.to(torch.int32), torch.rand(tokens, top_k, generator=g)


def run(layer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, cfg: GemvConfig,
        counters: torch.Tensor | None = None) -> torch.Tensor:
    p = prepare_moe(layer)
    return moe_gemv(x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, cfg, counters=counters)


@pytest.mark.parametrize("option", [*OPTIONS, "fused_combine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_each_option_gives_todays_bits_f32_step(option: str, dtype: torch.dtype) -> None:
    """H = 160: a partial last K step (k64) and a partial N block; I = 96 over a split of 2:
    each split ends in a partial step. Expert 1 is hit by every token, 4 of 8 by none."""
    cfg = tiny(160, 96, 8, 2)
    layer = random_layer(cfg, 0, seed=4, dtype=dtype)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(4)).to(dtype)
    ids = torch.tensor([[1, 0], [3, 1], [1, 6]], dtype=torch.int32)
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(5))
    opts = OPTIONS.get(option, {})
    got = run(layer, x, ids, w, gemv("f32", fuse=option == "fused_combine", **opts))
    assert torch.equal(got, run(layer, x, ids, w, gemv("f32")))


@pytest.mark.parametrize("option", ["prefetch1", "async"])
def test_the_f16_step_with_loads_ahead_and_fused_combine_gives_todays_bits(option: str) -> None:
    cfg = tiny(96, 64, 4, 2)
    layer = random_layer(cfg, 0, seed=6, dtype=torch.float16)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(6)).half()
    ids, w = routed(1, 4, 2, seed=6)
    got = run(layer, x, ids, w, gemv("f16", fuse=True, **OPTIONS[option]))
    assert torch.equal(got, run(layer, x, ids, w, gemv("f16")))


@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype", "option"),
    [
        (96, 160, 4, 1, 1, torch.float32, "prefetch2"),  # E = 4, k = 1, one token
        (96, 96, 4, 4, 2, torch.float16, "prefetch1"),  # k = E: every expert hit by every token
        (64, 96, 128, 4, 16, torch.float32, "async"),  # E = 128, 64 pairs, most experts empty
        (160, 64, 32, 1, 16, torch.float16, "prefetch2"),  # T = 16, k = 1
    ],
)
def test_fused_layer_matches_the_torch_reference(
    hidden: int, inter: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype,
    option: str,
) -> None:
    """The whole layer (fused router, routing, GEMVs with the fused combine) vs the oracle."""
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    mc = as_moe(gemv("f32", fuse=True, n=64, k=64, **OPTIONS[option]))
    check(cfg, layer, x, mc)


def test_every_token_on_one_expert_with_fused_combine() -> None:
    cfg = tiny(64, 96, 8, 2)
    layer = random_layer(cfg, 0, seed=5, dtype=torch.float32)
    layer.gate_bias[3] = 1e4  # expert 3 is everyone's first choice
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    check(cfg, layer, x, as_moe(gemv("f32", fuse=True, n=64, k=64, prefetch=1)))


def test_fused_combine_leaves_its_counters_at_zero_and_checks_them() -> None:
    """The last program of each N block resets its counter: a CUDA graph can replay the launch
    with no memset. The fused router's counter (the last entry) is never touched."""
    cfg = tiny(96, 64, 4, 2)
    layer = random_layer(cfg, 0, seed=8, dtype=torch.float32)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(8))
    ids, w = routed(2, 4, 2, seed=8)
    counters = torch.zeros(8, dtype=torch.int32)
    counters[-1] = 7
    fused = gemv("f32", fuse=True)
    first = run(layer, x, ids, w, fused, counters)
    assert counters[:-1].eq(0).all() and counters[-1] == 7
    assert torch.equal(run(layer, x, ids, w, fused, counters), first)
    with pytest.raises(ValueError, match="counters"):
        run(layer, x, ids, w, fused, torch.zeros(3, dtype=torch.int32))  # 96 / 32 blocks + 1


def test_gemv_tiles_check_the_latency_options() -> None:
    for bad in (dict(prefetch=3), dict(prefetch=1, async_copy=True), dict(prefetch=1),
                dict(async_copy=True)):
        dequant = "exact" if bad in (dict(prefetch=1), dict(async_copy=True)) else "f16"
        with pytest.raises(ValueError, match="prefetch"):
            GemvTiles(32, 256, dequant=dequant, **bad)
    assert GemvTiles(32, 256) == GemvTiles(32, 256, prefetch=0, async_copy=False)  # defaults


@pytest.mark.parametrize("name", sorted(GEMV2_CANDIDATES) + sorted(GEMV_WAVE_CANDIDATES))
def test_candidates_match_the_torch_reference(name: str) -> None:
    cfg = tiny(288, 64, 8, 2)  # K = 288: one whole k256 step and a partial one
    layer = random_layer(cfg, 0, seed=9, dtype=torch.float16)
    x = torch.randn(1, 288, generator=torch.Generator().manual_seed(9)).half()
    mc = {**GEMV2_CANDIDATES, **GEMV_WAVE_CANDIDATES}[name]
    got = moe_forward(x, layer, cfg, prepare_moe(layer), mc)
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), **TOL[torch.float16])
