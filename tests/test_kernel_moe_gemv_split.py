"""Split-K for the GEMV path's GEMM 1 (GemvConfig.split_k1, kernels/moe_gemv_split.py).

CPU, interpreted, fp16/fp32 (the fast steps through their Triton emulation). A split sums GEMM 1
in another fp32 order than the one launch, so split results are held to the oracle within the
layer tests' tolerance, and to themselves bit for bit (determinism); split 1 through the split
kernels must give the one launch's act exactly (their shared bias + swiglu tail). K = 288 is
9 groups: at k256 every split of 2 or more has no whole step, and splits past 9 groups are empty.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import MoEConfig, moe_forward, moe_forward_ref, prepare_moe
from kernels.moe_configs import GEMV_FAST
from kernels.moe_configs_gemv import GEMV_SPLIT_CANDIDATES
from kernels.moe_gemv import _DEQ, GemvConfig, GemvTiles, _words, gemv1_swiglu, moe_gemv, presplit
from kernels.moe_gemv_dequant import F16
from runtime.config import ModelConfig
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemv import SMALL_GEMV, TOL, tiny


def split_cfg(split: int, dequant: str = "f32", n: int = 32, k: int = 256, **gemm2: object
              ) -> GemvConfig:
    fuse = bool(gemm2.pop("fuse_combine", False))
    return GemvConfig(GemvTiles(n, k, dequant=dequant),
                      GemvTiles(n, k, split_k=2, dequant=dequant, **gemm2),
                      fuse_combine=fuse, split_k1=split)


def against_oracle(cfg: ModelConfig, layer, x: torch.Tensor, mc: MoEConfig) -> torch.Tensor:
    got = moe_forward(x, layer, cfg, prepare_moe(layer), mc)
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), **TOL[x.dtype])
    return got


def layer_and_x(hidden: int, inter: int, tokens: int, dtype: torch.dtype, seed: int,
                experts: int = 8, top_k: int = 2) -> tuple[ModelConfig, object, torch.Tensor]:
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=seed, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return cfg, layer, x


@pytest.mark.parametrize(("tokens", "dtype"), [(1, torch.float16), (3, torch.float32)])
@pytest.mark.parametrize("name", sorted(GEMV_SPLIT_CANDIDATES))
def test_split_candidates_match_the_torch_reference(name: str, tokens: int,
                                                    dtype: torch.dtype) -> None:
    """The whole layer as served: fused router writing the pre-split x, split GEMM 1, GEMM 2."""
    mc = GEMV_SPLIT_CANDIDATES[name]
    assert mc.fused_router and mc.gemv is not None and mc.gemv.split_k1 > 1
    cfg, layer, x = layer_and_x(288, 64, tokens, dtype, seed=9 + tokens)
    against_oracle(cfg, layer, x, mc)


def gemm1_act(layer, x: torch.Tensor, ids: torch.Tensor, dequant: str, dtype_math: torch.dtype,
              split: int | None) -> torch.Tensor:
    """act [T·k, I] of GEMM 1 alone, operands prepared as moe_gemv does; NaN where unwritten."""
    p = prepare_moe(layer)
    deq = _DEQ[dequant]
    xs = x if deq == 0 else presplit(x, dtype_math)
    w1 = p.w1
    if deq == F16.value:
        w1, xs = _words(w1), xs.view(torch.int64)
    act = torch.full((ids.numel(), p.w1.shape[1] // 2), float("nan"), dtype=dtype_math)
    gemv1_swiglu(x, xs, ids.view(-1), w1, p.s1, p.b1, act, ids.shape[1],
                 GemvTiles(128, 64, dequant=dequant), deq, 1.702, 7.0, split=split)
    return act


@pytest.mark.parametrize(("dequant", "dtype", "math"), [
    ("exact", torch.float32, torch.float32),
    ("f32", torch.float16, torch.float32),
    ("f16", torch.float16, torch.float16),
])
def test_split_one_through_the_split_kernels_gives_the_one_launchs_act(
    dequant: str, dtype: torch.dtype, math: torch.dtype,
) -> None:
    """K = 288: 4 whole k64 steps and a partial one; 2I = 576 rows: a partial 128-row block, and
    288 act columns: a whole and a partial block of the sum launch's 256. Expert 1 hit twice, 5 of
    8 experts not at all."""
    _, layer, x = layer_and_x(288, 288, 3, dtype, seed=21)
    ids = torch.tensor([[1, 0], [3, 1], [1, 6]], dtype=torch.int32)
    want = gemm1_act(layer, x, ids, dequant, math, split=None)
    got = gemm1_act(layer, x, ids, dequant, math, split=1)
    assert not want.isnan().any()
    assert torch.equal(got, want)


def test_split_is_deterministic_and_close_to_the_one_launch() -> None:
    _, layer, x = layer_and_x(288, 96, 3, torch.float32, seed=22)
    ids = torch.tensor([[2, 0], [0, 5], [7, 2]], dtype=torch.int32)
    once = gemm1_act(layer, x, ids, "f32", torch.float32, split=3)
    assert not once.isnan().any()
    assert torch.equal(gemm1_act(layer, x, ids, "f32", torch.float32, split=3), once)
    torch.testing.assert_close(once, gemm1_act(layer, x, ids, "f32", torch.float32, split=None),
                               **TOL[torch.float32])
    p = prepare_moe(layer)
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(22))
    outs = [moe_gemv(x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, split_cfg(3))
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("split", "dequant", "dtype"), [
    (4, "exact", torch.float32),  # 3 + 3 + 3 groups and an empty split
    (9, "f16", torch.float16),  # one group per split
    (16, "f32", torch.float32),  # 9 one-group splits, 7 empty ones
])
def test_k_splits_without_a_whole_step_match_the_torch_reference(
    split: int, dequant: str, dtype: torch.dtype,
) -> None:
    cfg, layer, x = layer_and_x(288, 64, 2, dtype, seed=split)
    mc = MoEConfig(16, SMALL_GEMV.gemm1, SMALL_GEMV.gemm2, gemv=split_cfg(split, dequant))
    against_oracle(cfg, layer, x, mc)


def test_split_with_gemm2_options_and_a_hot_expert() -> None:
    """GEMM 2's register look-ahead and fused combine read the split's act as they read today's."""
    cfg, layer, x = layer_and_x(288, 64, 4, torch.float16, seed=5)
    layer.gate_bias[3] = 1e4  # expert 3 is everyone's first choice
    gemv = split_cfg(2, n=64, k=64, prefetch=1, fuse_combine=True)
    against_oracle(cfg, layer, x, MoEConfig(16, SMALL_GEMV.gemm1, SMALL_GEMV.gemm2, gemv=gemv))


def test_split_k1_is_validated_and_off_by_default() -> None:
    tiles = GemvTiles(32, 256)
    for bad in (0, -1, 17, 2.0, True):
        with pytest.raises(ValueError, match="split_k1"):
            GemvConfig(tiles, tiles, split_k1=bad)  # type: ignore[arg-type]
    assert GemvConfig(tiles, tiles).split_k1 == 1
    assert GEMV_FAST.gemv is not None and GEMV_FAST.gemv.split_k1 == 1


@pytest.mark.parametrize("gemm1", [dict(prefetch=1), dict(async_copy=True)])
def test_split_with_gemm1_look_ahead_loads(gemm1: dict) -> None:
    """GEMM 1's look-ahead options (registers, cp.async) run through the split kernel too."""
    cfg, layer, x = layer_and_x(288, 64, 3, torch.float16, seed=7)
    base = split_cfg(2, dequant="f16", n=32, k=64)
    gemv = GemvConfig(GemvTiles(32, 64, dequant="f16", **gemm1), base.gemm2, split_k1=2)
    against_oracle(cfg, layer, x, MoEConfig(16, SMALL_GEMV.gemm1, SMALL_GEMV.gemm2, gemv=gemv))
