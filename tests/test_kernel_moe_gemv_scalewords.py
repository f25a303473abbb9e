"""GEMV scale words (kernels/moe_gemv_scales.py, `GemvTiles.scale_words`) against the byte layout.

CPU, interpreted (the fast steps through their Triton emulation). The words only change where the
exponents come from, not the arithmetic: every run must give the byte layout's bits, including
groups counts that are not a multiple of 4 (a partial last word), K splits that start inside a
word, partial K steps and N blocks, empty experts and one expert hit by every token.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.moe import moe_forward, moe_forward_ref, prepare_moe
from kernels.moe_configs import MoEConfig
from kernels.moe_configs_gemv import GEMV_SCALEWORD_CANDIDATES
from kernels.moe_gemv import GemvConfig, GemvTiles, moe_gemv
from kernels.moe_gemv_scales import scale_bytes, scale_words
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemv import TOL, tiny
from tests.test_kernel_moe_gemv_mlp import routed


def gemv(dequant: str, words: bool, n: int = 32, k: int = 64, split: int = 2,
         **opts: object) -> GemvConfig:
    fuse = bool(opts.pop("fuse", False))
    return GemvConfig(GemvTiles(n, k, dequant=dequant, scale_words=words, **opts),
                      GemvTiles(n, k, split_k=split, dequant=dequant, scale_words=words, **opts),
                      fuse_combine=fuse)


def both(layer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, dequant: str, **tiles
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte layout, word layout) outputs of the same tiles."""
    p = prepare_moe(layer, scale_words=True)
    args = (x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2)
    old = moe_gemv(*args, gemv(dequant, False, **tiles))
    new = moe_gemv(*args, gemv(dequant, True, **tiles), scale_words=(p.sw1, p.sw2))
    return old, new


@pytest.mark.parametrize("groups", [1, 4, 5, 7, 90])
def test_scale_words_hold_four_groups_per_row_little_endian(groups: int) -> None:
    s = torch.randint(0, 256, (3, 6, groups), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(groups))
    w = scale_words(s)
    g4 = -(-groups // 4)
    assert w.dtype == torch.int32 and w.shape == (3, 6, g4)
    assert w.stride() == (g4 * 6, 1, 6)  # words-major: a step's words of a row block adjacent
    for e, n, j in ((0, 0, 0), (2, 5, groups - 1), (1, 3, groups // 2)):
        word = int(w[e, n, j // 4]) & 0xFFFFFFFF
        assert (word >> (8 * (j % 4))) & 0xFF == int(s[e, n, j])
    tail = [(int(w[e, n, -1]) & 0xFFFFFFFF) >> (8 * (groups % 4)) for e in range(3)
            for n in range(6)] if groups % 4 else []
    assert all(t == 0 for t in tail)  # padding groups are zero bytes
    assert torch.equal(scale_bytes(w, groups), s)
    # the prepared views (groups-major bytes) give the same words
    assert torch.equal(scale_words(s.transpose(1, 2).contiguous().transpose(1, 2)), w)


@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype", "dequant"),
    [
        (160, 96, 4, 1, 1, torch.float32, "f32"),  # G = 5 / 3: partial words; E = 4, k = 1
        (160, 96, 4, 2, 3, torch.float16, "f16"),  # split 2 of I: split 1 starts at group 2
        (224, 160, 4, 4, 2, torch.float16, "f32"),  # k = E: every expert hit by every token
        (96, 224, 32, 4, 4, torch.float16, "f16"),  # E = 32: most experts empty
        (224, 96, 32, 2, 4, torch.float32, "f32"),
        (96, 160, 32, 1, 3, torch.float32, "f16"),  # f16 tiles on fp32 x run the f32 step
    ],
)
def test_scale_words_give_the_byte_layouts_bits(hidden: int, inter: int, experts: int,
                                                top_k: int, tokens: int, dtype: torch.dtype,
                                                dequant: str) -> None:
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens + experts, dtype=dtype)
    gen = torch.Generator().manual_seed(hidden + tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids, w = routed(tokens, experts, top_k, seed=inter)
    old, new = both(layer, x, ids, w, dequant)
    assert torch.isfinite(old).all()
    assert torch.equal(new, old)


@pytest.mark.parametrize("dequant", ["f32", "f16"])
def test_one_hot_expert_with_wide_steps_and_the_fused_combine(dequant: str) -> None:
    """Every token's first choice is expert 1; k256 steps over K = 224 (one partial step) and
    32-row blocks over N = 160 / 448: partial blocks, loads masked past K."""
    cfg = tiny(224, 224, 8, 2)
    layer = random_layer(cfg, 0, seed=11, dtype=torch.float16)
    x = torch.randn(4, 224, generator=torch.Generator().manual_seed(11)).half()
    ids = torch.tensor([[1, 0], [1, 5], [1, 2], [1, 7]], dtype=torch.int32)
    w = torch.rand(4, 2, generator=torch.Generator().manual_seed(12))
    old, new = both(layer, x, ids, w, dequant, k=256, fuse=True)
    assert torch.equal(new, old)


@pytest.mark.parametrize("option", [dict(prefetch=1), dict(async_copy=True)])
def test_scale_words_with_loads_ahead(option: dict) -> None:
    cfg = tiny(160, 96, 4, 2)
    layer = random_layer(cfg, 0, seed=13, dtype=torch.float16)
    x = torch.randn(2, 160, generator=torch.Generator().manual_seed(13)).half()
    ids, w = routed(2, 4, 2, seed=13)
    old, new = both(layer, x, ids, w, "f16", **option)
    assert torch.equal(new, old)


def candidate_layer(mc: MoEConfig) -> tuple[ModelConfig, LayerWeights, torch.Tensor, torch.Tensor]:
    """One fp16 token through a whole layer (fused router, GEMVs) with GEMV candidate mc, checked
    against the oracle: (config, layer, x, output). K = 288: one whole k256 step and a partial
    one; G = 9."""
    cfg = tiny(288, 160, 8, 2)
    layer = random_layer(cfg, 0, seed=9, dtype=torch.float16)
    x = torch.randn(1, 288, generator=torch.Generator().manual_seed(9)).half()
    assert mc.gemv is not None
    got = moe_forward(x, layer, cfg, prepare_moe(layer, scale_words=True), mc)
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), **TOL[torch.float16])
    return cfg, layer, x, got


def without(mc: MoEConfig, option: str) -> MoEConfig:
    """mc with a GemvTiles option turned off in both GEMMs."""
    assert mc.gemv is not None
    g = mc.gemv
    return replace(mc, gemv=replace(g, gemm1=replace(g.gemm1, **{option: False}),
                                    gemm2=replace(g.gemm2, **{option: False})))


@pytest.mark.parametrize("name", sorted(GEMV_SCALEWORD_CANDIDATES))
def test_candidates_match_the_oracle_and_the_byte_layout(name: str) -> None:
    """The whole layer with a candidate: against the oracle, and bit-equal to the same tiles on
    bytes. Without prepared weights moe_forward builds the words itself."""
    mc = GEMV_SCALEWORD_CANDIDATES[name]
    cfg, layer, x, got = candidate_layer(mc)
    on_bytes = without(mc, "scale_words")
    assert torch.equal(got, moe_forward(x, layer, cfg, prepare_moe(layer), on_bytes))
    assert torch.equal(moe_forward(x, layer, cfg, None, mc), got)


def test_word_tiles_need_words_and_a_fast_step() -> None:
    cfg = tiny(96, 64, 4, 2)
    layer = random_layer(cfg, 0, seed=3, dtype=torch.float32)
    p = prepare_moe(layer)
    assert p.sw1 is None and p.sw2 is None  # only built when asked
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(3))
    ids, w = routed(1, 4, 2, seed=3)
    with pytest.raises(ValueError, match="scale words"):
        moe_gemv(x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, gemv("f32", True))
    with pytest.raises(ValueError, match="int32"):  # bytes passed where words belong
        moe_gemv(x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, gemv("f32", True),
                 scale_words=(p.s1, p.s2))
    with pytest.raises(ValueError, match="scale_words"):
        GemvTiles(32, 256, dequant="exact", scale_words=True)
    assert GemvTiles(32, 256).scale_words is False  # the default reads bytes
