"""The f16 GEMV step with its loads first (`GemvTiles.loads_first`, kernels/moe_gemv_fence.py).

CPU, interpreted (the step through its Triton emulation, the fence's zero as k >> 31). The fence
only ORs a zero into the first code word: every run must give the plain f16 step's bits (fp16
activations), or the f32 step's (fp32 activations: f16 tiles run the f32 step there).
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import moe_forward, prepare_moe
from kernels.moe_configs_gemv import GEMV_LOADSFIRST_CANDIDATES
from kernels.moe_gemv import GemvConfig, GemvTiles, moe_gemv
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemv import tiny
from tests.test_kernel_moe_gemv_mlp import routed
from tests.test_kernel_moe_gemv_scalewords import candidate_layer, without


def gemv(first: bool, k: int, fuse: bool = False) -> GemvConfig:
    return GemvConfig(GemvTiles(32, k, dequant="f16", loads_first=first),
                      GemvTiles(32, k, split_k=2, dequant="f16", loads_first=first),
                      fuse_combine=fuse)


@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype", "k", "fuse"),
    [
        (160, 96, 4, 2, 3, torch.float16, 64, False),  # split 2 of I: a partial step each
        (224, 160, 8, 2, 2, torch.float16, 256, True),  # one partial k256 step, fused combine
        (96, 160, 4, 2, 1, torch.float16, 32, False),  # one group per step: nothing to fold
        (96, 96, 4, 2, 2, torch.float32, 64, False),  # fp32 x: the f32 step
    ],
)
def test_loads_first_gives_the_f16_steps_bits(hidden: int, inter: int, experts: int, top_k: int,
                                              tokens: int, dtype: torch.dtype, k: int,
                                              fuse: bool) -> None:
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens + experts, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(hidden)).to(dtype)
    ids, w = routed(tokens, experts, top_k, seed=inter)
    p = prepare_moe(layer)
    args = (x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2)
    old = moe_gemv(*args, gemv(False, k, fuse))
    new = moe_gemv(*args, gemv(True, k, fuse))
    assert torch.isfinite(old).all() and old.abs().sum() > 0
    assert torch.equal(new, old)


def test_candidate_matches_the_oracle_and_the_plain_step() -> None:
    name = "g6_n32k256f16bw"  # loads first + scale words: the most moving parts
    mc = GEMV_LOADSFIRST_CANDIDATES[name]
    cfg, layer, x, got = candidate_layer(mc)
    plain = without(mc, "loads_first")
    assert torch.equal(got, moe_forward(x, layer, cfg, prepare_moe(layer, scale_words=True),
                                        plain))


def test_loads_first_only_for_the_plain_f16_step() -> None:
    for bad in (dict(dequant="f32"), dict(dequant="f16", prefetch=1),
                dict(dequant="f16", async_copy=True)):
        with pytest.raises(ValueError, match="loads_first"):
            GemvTiles(32, 256, loads_first=True, **bad)
    assert GemvTiles(32, 256, dequant="f16").loads_first is False  # opt-in
