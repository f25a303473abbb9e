"""The whole MoE layer (kernels/moe.py) against the torch oracle (kernels/moe_ref.py).

CPU: interpreted kernels at small shapes in fp32/fp16. GPU (-m gpu): real gpt-oss shapes in bf16,
routing checked on its own, experts against the oracle on the kernel's routing, determinism and a
CUDA graph replay equal to eager.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import (
    DECODE,
    DECODE_WIDE,
    MoEConfig,
    choose_config,
    moe_forward,
    moe_forward_ref,
    prepare_moe,
    router_logits,
)
from kernels.moe_configs import DECODE_SA, GEMV_FAST, MIDDLE_SA, PREFILL_SA
from kernels.moe_configs_decode2 import DECODE2_CANDIDATES
from kernels.moe_configs_prefill import PREFILL2_CANDIDATES
from kernels.moe_gemm import GemmTiles
from kernels.moe_ref import experts_ref, route_ref
from kernels.moe_routing import route
from runtime.config import ModelConfig
from runtime.synthetic import random_layer

SMALL_SWAP = MoEConfig(16, GemmTiles(16, 64, swap_ab=True), GemmTiles(32, 32, swap_ab=True))
SMALL_PREFILL = MoEConfig(32, GemmTiles(32, 64), GemmTiles(16, 32, group_m=2))
FUSED_ROUTER = MoEConfig(16, GemmTiles(32, 64, swap_ab=True), GemmTiles(32, 64, swap_ab=True),
                         fuse_combine=True, fused_router=True)


def tiny(hidden: int, inter: int, experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
        experts_per_token=top_k,
    )


@pytest.mark.parametrize(
    ("hidden", "inter", "experts", "top_k", "tokens", "dtype", "moe_config"),
    [
        (64, 96, 4, 1, 7, torch.float32, DECODE),  # E = 4, k = 1
        (96, 64, 4, 4, 20, torch.float16, None),  # k = E
        (64, 32, 128, 4, 9, torch.float32, SMALL_SWAP),  # E = 128: most experts empty
        (32, 64, 8, 2, 45, torch.float32, SMALL_PREFILL),  # several tiles per expert
        (96, 96, 32, 4, 3, torch.float16, SMALL_SWAP),
        (64, 64, 32, 4, 5, torch.float32, FUSED_ROUTER),  # router + routing in one launch
        (64, 64, 32, 4, 6, torch.float16, FUSED_ROUTER),
        (64, 64, 8, 2, 40, torch.float16, None),  # default: 16-byte code loads
        (64, 64, 4, 2, 40, torch.float16, None),  # default: L2 prefetch + 16-byte loads
        # the decode default: the fused router also writes the GEMV's pre-split x
        (64, 64, 32, 4, 1, torch.float32, GEMV_FAST),
        (96, 64, 32, 4, 3, torch.float16, GEMV_FAST),
    ],
)
def test_moe_layer_matches_the_torch_reference(
    hidden: int, inter: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype,
    moe_config: MoEConfig | None,
) -> None:
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    got = moe_forward(x, layer, cfg, prepare_moe(layer), moe_config)
    want = moe_forward_ref(x, layer, cfg)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-3, atol=3e-3)
    torch.testing.assert_close(got, want, **tol)


def test_misaligned_codes_fall_back_to_the_plain_tiles() -> None:
    """The 16-byte loads and the prefetch need 16-byte aligned code rows; codes that are a view
    at an odd offset (a checkpoint's packed buffer) run the same tiles without them."""
    cfg = tiny(64, 64, 8, 2)
    layer = random_layer(cfg, 0, seed=9, dtype=torch.float16)
    blocks = layer.mlp1_blocks
    buf = torch.empty(blocks.numel() + 1, dtype=blocks.dtype)
    buf[1:] = blocks.reshape(-1)
    layer.mlp1_blocks = buf[1:].view(blocks.shape)  # 1 byte past an aligned allocation
    prepared = prepare_moe(layer)
    assert not prepared.aligned
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    got = moe_forward(x, layer, cfg, prepared, DECODE_WIDE)
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), rtol=3e-3, atol=3e-3)


def test_every_token_on_one_expert() -> None:
    cfg = tiny(64, 64, 8, 2)
    layer = random_layer(cfg, 0, seed=5, dtype=torch.float32)
    layer.gate_bias[3] = 1e4  # expert 3 is everyone's first choice
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    plan = route(router_logits(x, layer), 2, 16)
    assert plan.counts[3].item() == 40
    got = moe_forward(x, layer, cfg, moe_config=SMALL_PREFILL)
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), rtol=1e-5, atol=1e-5)


def test_prepare_relays_exponents_groups_major_without_changing_values() -> None:
    cfg = tiny(64, 64, 8, 2)
    layer = random_layer(cfg, 0, seed=4, dtype=torch.float32)
    before = layer.mlp1_scales.clone()
    p = prepare_moe(layer)
    assert p.s1.stride(1) == 1 and layer.mlp1_scales is p.s1  # one copy, groups-major storage
    assert torch.equal(layer.mlp1_scales, before)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe_forward(x, layer, cfg, p), moe_forward_ref(x, layer, cfg),
                               rtol=1e-5, atol=1e-5)


def test_no_tokens() -> None:
    cfg = tiny(32, 32, 4, 2)
    layer = random_layer(cfg, 0, dtype=torch.float32)
    assert moe_forward(torch.empty(0, 32), layer, cfg).shape == (0, 32)


def test_config_follows_rows_per_expert() -> None:
    assert choose_config(1, 4, 32).gemv is not None  # small batches: GEMVs (test_kernel_moe_gemv)
    assert choose_config(8, 4, 32).gemv is not None  # one row per expert: still GEMVs
    assert choose_config(16, 4, 128).gemv is not None  # 64 pairs over 128 experts: GEMVs
    wide = DECODE2_CANDIDATES["d2_n256k64st3"]  # 20b's experts: wider, pipelined tiles
    assert choose_config(16, 4, 32) is wide  # 2 rows per expert: tiles
    assert choose_config(64, 4, 32) is wide  # 8 rows
    assert choose_config(64, 4, 128) is DECODE_SA  # 120b's experts, 2 rows
    assert choose_config(256, 4, 128) is DECODE_SA
    assert choose_config(128, 4, 32) is MIDDLE_SA  # 16 rows
    assert choose_config(512, 4, 32) is MIDDLE_SA  # 64 rows
    assert choose_config(513, 4, 32) is PREFILL_SA
    assert choose_config(2047, 4, 32) is PREFILL_SA  # < 256 rows
    # 4096 tokens of 20b: the activations in MMA order first (H100 run 49, H200 run 50)
    assert choose_config(4096, 4, 32) is PREFILL2_CANDIDATES["p2_sa_ready"]


def test_defaults_are_the_measured_sweep_candidates() -> None:
    from kernels.moe_configs_latency import LATENCY_CANDIDATES

    assert LATENCY_CANDIDATES["m_w_sa"] == DECODE_SA
    assert LATENCY_CANDIDATES["m_m32_sa"] == MIDDLE_SA
    assert LATENCY_CANDIDATES["m_p_pf4w_sa"] == PREFILL_SA


# ---- GPU, real shapes ------------------------------------------------------------------------------
def real(name: str) -> ModelConfig:
    return ModelConfig(num_hidden_layers=1, num_experts=32 if name == "20b" else 128)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", ["20b", "120b"])
@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 4096])
def test_gpu_moe_matches_reference_at_real_shapes(shape: str, tokens: int) -> None:
    cfg = real(shape)
    layer = random_layer(cfg, 0, seed=11, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", generator=torch.Generator(
        "cuda").manual_seed(tokens)).to(torch.bfloat16)
    prepared = prepare_moe(layer)
    k = cfg.experts_per_token
    logits = router_logits(x, layer)
    plan = route(logits, k, choose_config(tokens, k, cfg.num_experts).block_m)
    ref_w, ref_e = route_ref(x, layer.gate_weight, layer.gate_bias, k)
    # Routing: identical wherever the bf16 logits have no tie at the k-th place.
    top = torch.topk(logits.float(), k + 1, dim=-1).values
    clear = (top[:, k - 1] > top[:, k]) & (top[:, :k].diff(dim=-1) < 0).all(-1)
    assert clear.float().mean() > 0.5
    assert torch.equal(plan.experts.long()[clear], ref_e[clear])
    torch.testing.assert_close(plan.weights[clear], ref_w[clear], rtol=1e-5, atol=1e-6)
    # Experts: on the kernel's own routing, against the oracle.
    got = moe_forward(x, layer, cfg, prepared)
    want = experts_ref(
        x, plan.weights, plan.experts.long(), layer.mlp1_blocks, layer.mlp1_scales,
        layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
    )
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert (got.float() - want.float()).abs().max() < 0.05 * want.float().abs().max()
    assert torch.equal(got, moe_forward(x, layer, cfg, prepared))  # deterministic


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_moe_in_a_cuda_graph_equals_eager(tokens: int) -> None:
    cfg = real("20b")
    layer = random_layer(cfg, 0, seed=3, device="cuda", dtype=torch.bfloat16)
    prepared = prepare_moe(layer)
    static_x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_forward(static_x, layer, cfg, prepared)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe_forward(static_x, layer, cfg, prepared)
    for seed in range(3):
        x = torch.randn(tokens, cfg.hidden_size, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(seed)).to(torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, moe_forward(x, layer, cfg, prepared))
