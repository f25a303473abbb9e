"""The small-batch GEMV path of the MoE (kernels/moe_gemv.py) against the torch oracle.

CPU: interpreted kernels at small shapes (fp32, fp16 and bf16: no tl.dot here), the fast steps
through their Triton emulation (their PTX: tests/test_kernel_moe_gemv_ptx.py). GPU (-m gpu):
gpt-oss shapes in bf16, eager and inside a captured CUDA graph, the fast steps' compiled PTX.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import GEMV, MoEConfig, choose_config, moe_forward, moe_forward_ref, prepare_moe
from kernels.moe_configs import (
    GEMV_CANDIDATES,
    GEMV_MAX_PAIRS,
)
from kernels.moe_configs_gemv import GEMV_ONE, GEMV_SMALL
from kernels.moe_gemv import GemvConfig, GemvTiles, moe_gemv
from kernels.moe_ref import experts_ref
from runtime.config import ModelConfig
from runtime.mxfp4 import quantize
from runtime.synthetic import random_layer

# Blocks smaller than the test shapes, so several N blocks, K steps and a partial last step run.
SMALL = GemvConfig(GemvTiles(16, 64), GemvTiles(16, 64, split_k=2))
SMALL_GEMV = MoEConfig(16, GEMV.gemm1, GEMV.gemm2, gemv=SMALL)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=3e-3, atol=3e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def tiny(hidden: int, inter: int, experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
        experts_per_token=top_k,
    )


def check(cfg: ModelConfig, layer, x: torch.Tensor, mc: MoEConfig = SMALL_GEMV) -> None:
    got = moe_forward(x, layer, cfg, prepare_moe(layer), mc)
    want = moe_forward_ref(x, layer, cfg)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[x.dtype])


@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype"),
    [
        (96, 160, 4, 1, 1, torch.float32),  # E = 4, k = 1; sizes not multiples of the blocks
        (96, 96, 4, 4, 2, torch.float16),  # k = E
        (160, 96, 32, 4, 3, torch.float32),
        (64, 96, 32, 4, 8, torch.float16),  # 32 pairs: twice the default cut-over
        (96, 64, 128, 4, 16, torch.float32),  # E = 128, 64 pairs (the sweep's largest)
        (64, 64, 32, 1, 16, torch.bfloat16),  # bf16 runs in the interpreter: no tl.dot here
        (96, 32, 8, 2, 2, torch.bfloat16),
    ],
)
def test_gemv_layer_matches_the_torch_reference(
    hidden: int, inter: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype,
) -> None:
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    check(cfg, layer, x)


def fast(dequant: str) -> MoEConfig:
    return MoEConfig(16, GEMV.gemm1, GEMV.gemm2, gemv=GemvConfig(
        GemvTiles(16, 64, dequant=dequant), GemvTiles(16, 64, split_k=2, dequant=dequant)))


@pytest.mark.parametrize("dequant", ["f16", "f32"])
@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype"),
    [
        (96, 160, 4, 2, 3, torch.float32),  # fp32 x: fp32 math either way (tolerance 1e-5)
        (160, 96, 8, 4, 2, torch.float16),  # partial last K step, partial N block
        (96, 64, 32, 1, 5, torch.bfloat16),
    ],
)
def test_fast_steps_match_the_torch_reference(
    dequant: str, hidden: int, inter: int, experts: int, top_k: int, tokens: int,
    dtype: torch.dtype,
) -> None:
    """Word-wise dequantization on pre-split x (kernels/moe_gemv_dequant.py), as emulated in the
    interpreter: the same tolerances as the exact step, fp16 accumulation included."""
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens + 20, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    check(cfg, layer, x, fast(dequant))


@pytest.mark.parametrize("dequant", ["f16", "f32"])
@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 100), (torch.float16, 140),
                                              (torch.float32, 0), (torch.float32, 240)])
def test_fast_steps_are_exact_at_extreme_scales(dequant: str, dtype: torch.dtype,
                                                scale: int) -> None:
    """One-hot x picks single W1 weights: fp4·2^(s − 127) must survive the fp32 scale bits
    (s + 6) << 23 (normal over 0…248); fp16 x: scales whose weights fit fp16. GEMM 2 (random
    weights) differs from the oracle by summation order only: the usual tolerances."""
    cfg = tiny(64, 64, 4, 1)
    layer = random_layer(cfg, 0, seed=1, dtype=dtype)
    layer.mlp1_scales.fill_(scale)
    layer.mlp1_bias.zero_()
    p = prepare_moe(layer)
    x = torch.zeros(4, 64, dtype=dtype)
    x[torch.arange(4), torch.arange(4) * 7] = 1.0  # k = 0, 7, 14, 21: both nibbles, all words
    experts = torch.zeros(4, 1, dtype=torch.int32)
    ones = torch.ones(4, 1)
    got = moe_gemv(x, experts, ones, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, fast(dequant).gemv)
    want = experts_ref(x, ones, experts.long(), layer.mlp1_blocks, layer.mlp1_scales,
                       layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias)
    assert torch.isfinite(want).all() or scale > 200
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


def test_gemv_tiles_check_the_dequant_mode() -> None:
    with pytest.raises(ValueError, match="dequant"):
        GemvTiles(32, 256, dequant="f8")
    cfg = tiny(32, 32, 4, 1)
    p = prepare_moe(random_layer(cfg, 0, dtype=torch.float16))
    mixed = GemvConfig(GemvTiles(16, 32, dequant="f16"), GemvTiles(16, 32))
    one = torch.ones(1, 1)
    with pytest.raises(ValueError, match="same dequant"):
        moe_gemv(torch.ones(1, 32, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.int32),
                 one, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, mixed)


@pytest.mark.parametrize("name", ["g_n16k512", "g_n32k128nos", "g_n64k256f16",
                                  "g_n128k128nosf32", "g_n32k128nosf16"])
def test_swept_gemv_configs_are_right(name: str) -> None:
    cfg = tiny(288, 320, 8, 4)  # K = 288: a partial last step for every block_k
    layer = random_layer(cfg, 0, seed=7, dtype=torch.float32)
    x = torch.randn(2, 288, generator=torch.Generator().manual_seed(3))
    check(cfg, layer, x, GEMV_CANDIDATES[name])


def test_every_token_on_one_expert() -> None:
    cfg = tiny(64, 96, 8, 2)
    layer = random_layer(cfg, 0, seed=5, dtype=torch.float32)
    layer.gate_bias[3] = 1e4  # expert 3 is everyone's first choice
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    check(cfg, layer, x)


@pytest.mark.parametrize("scale", [100, 140, 0, 240])
def test_gemv_is_exact_at_extreme_scales(scale: int) -> None:
    """Scale bytes across the GEMV's range (≤ 240): every W1 group holds the same exponent and
    known values, x is one-hot, so GEMM 1 sees single exact weights; what is left differs from
    the oracle only by fp32 summation order in GEMM 2."""
    cfg = tiny(64, 64, 4, 1)
    layer = random_layer(cfg, 0, seed=1, dtype=torch.float32)
    layer.mlp1_scales.fill_(scale)
    layer.mlp2_scales.fill_(scale)
    w1 = torch.tensor([0.5, -6.0, 1.5, 4.0]).repeat(layer.mlp1_blocks.shape[1], 16)
    layer.mlp1_blocks.copy_(quantize(w1)[0].expand_as(layer.mlp1_blocks))
    layer.mlp1_bias.zero_()
    x = torch.zeros(4, 64)
    x[torch.arange(4), torch.arange(4)] = 1.0
    experts = torch.zeros(4, 1, dtype=torch.int32)
    ones = torch.ones(4, 1)
    p = prepare_moe(layer)
    assert p.gemv_ok
    got = moe_gemv(x, experts, ones, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2, SMALL)
    want = experts_ref(x, ones, experts.long(), layer.mlp1_blocks, layer.mlp1_scales,
                       layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias)
    assert torch.isfinite(want).all() or scale > 200
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30, equal_nan=True)


def test_scales_above_240_fall_back_to_the_exact_tile_path() -> None:
    cfg = tiny(64, 64, 4, 2)
    layer = random_layer(cfg, 0, seed=2, dtype=torch.float32)
    layer.mlp2_scales[0, 0, 0] = 241
    assert not prepare_moe(layer).gemv_ok


def test_no_tokens() -> None:
    cfg = tiny(32, 32, 4, 2)
    layer = random_layer(cfg, 0, dtype=torch.float32)
    assert moe_forward(torch.empty(0, 32), layer, cfg, moe_config=SMALL_GEMV).shape == (0, 32)


def test_small_batches_choose_the_gemv() -> None:
    # one token: the f16 step with its loads first and the combine in GEMM 2 (H100, run 49)
    assert choose_config(1, 4, 32) is GEMV_ONE
    # more tokens: the same step, GEMM 2 and the combine apart (H200, run 50)
    assert choose_config(2, 4, 32) is GEMV_SMALL
    assert choose_config(GEMV_MAX_PAIRS // 4, 4, 128) is GEMV_SMALL
    assert choose_config(GEMV_MAX_PAIRS // 4 + 1, 4, 128).gemv is None


# ---- GPU, real shapes ------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", ["20b", "120b"])
@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
@pytest.mark.parametrize("name", ["g_n16k512", "g_n32k128nos", "g_n32k256f16", "g_n64k256f16",
                                  "g_n128k128nosf16", "g_n32k256f32"])
def test_gpu_gemv_matches_reference_and_replays_in_a_graph(shape: str, tokens: int,
                                                           name: str) -> None:
    cfg = ModelConfig(num_hidden_layers=1, num_experts=32 if shape == "20b" else 128)
    layer = random_layer(cfg, 0, seed=11, device="cuda", dtype=torch.bfloat16)
    prepared = prepare_moe(layer)
    mc = GEMV_CANDIDATES[name]
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", generator=torch.Generator(
        "cuda").manual_seed(tokens)).to(torch.bfloat16)
    got = moe_forward(x, layer, cfg, prepared, mc)
    want = moe_forward_ref(x, layer, cfg)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert torch.equal(got, moe_forward(x, layer, cfg, prepared, mc))  # deterministic
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe_forward(static_x, layer, cfg, prepared, mc)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, moe_forward(x2, layer, cfg, prepared, mc))
