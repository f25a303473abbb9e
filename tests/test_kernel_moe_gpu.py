"""GPU checks of what the CPU interpreter cannot run: the PTX dequantization of the fast path, and
every tile configuration the benchmark may pick, at real gpt-oss shapes (pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from kernels.moe import moe_experts, prepare_moe, router_logits
from kernels.moe_configs import DECODE_CANDIDATES, PREFILL_CANDIDATES, MoEConfig
from kernels.moe_configs_latency import LATENCY_CANDIDATES
from kernels.moe_configs_prefill import PREFILL2_CANDIDATES
from kernels.moe_gemm import GemmTiles, gemm1_swiglu, gemm2_scale
from kernels.moe_ref import experts_ref
from kernels.moe_routing import route, route_plan_ref
from runtime.config import ModelConfig
from runtime.mxfp4 import dequantize
from runtime.synthetic import random_layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("tiles", [GemmTiles(64, 128, swap_ab=True), GemmTiles(128, 64)],
                         ids=["swap", "plain"])
def test_fast_path_dequantizes_every_code_and_scale_exactly(tiles: GemmTiles) -> None:
    experts, hidden, inter = 2, 256, 256
    codes = torch.arange(256, dtype=torch.uint8).repeat(experts * hidden * inter // 512)
    codes = codes.view(experts, hidden, inter // 2).cuda()
    scales = torch.arange(107, 137, dtype=torch.uint8).repeat(experts * hidden * inter // 32)
    scales = scales[: experts * hidden * inter // 32].view(experts, hidden, inter // 32).cuda()
    tokens = inter  # token t routes to expert t % 2 and carries the one-hot row t
    logits = torch.full((tokens, experts), -1.0)
    logits[torch.arange(tokens), torch.arange(tokens) % experts] = 1.0
    plan = route(logits.cuda(), 1, 16)
    act = torch.eye(inter, device="cuda", dtype=torch.float16)[plan.sorted_pair.long()]
    bias = torch.zeros(experts, hidden, device="cuda")
    y = gemm2_scale(act, codes, scales, bias, plan, tiles, fast=True, out_dtype=torch.float32)[0]
    y = y / plan.weights.reshape(-1)[plan.sorted_pair.long()][:, None]
    w = dequantize(codes.view(experts, hidden, inter // 32, 16), scales)  # [E, H, I] fp32
    tok = plan.sorted_pair.long()
    assert torch.equal(y, w[tok % experts, :, tok])


@pytest.mark.parametrize("swap", [True, False])
def test_compiled_fast_path_equals_its_interpreted_emulation(swap: bool) -> None:
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 4, 96, 64, 24, 2
    logits = torch.randn(tokens, experts, generator=g)
    codes = torch.randint(0, 256, (experts, 2 * inter, hidden // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(116, 126, (experts, 2 * inter, hidden // 32), dtype=torch.uint8,
                           generator=g)
    bias = torch.randn(experts, 2 * inter, generator=g)
    x = torch.randn(tokens, hidden, generator=g).half()
    tiles = GemmTiles(64, 64, swap_ab=swap)
    cpu = gemm1_swiglu(x, codes, scales, bias, route_plan_ref(logits, k, 16), k, 1.702, 7.0,
                       tiles, fast=True)
    gpu = gemm1_swiglu(x.cuda(), codes.cuda(), scales.cuda(), bias.cuda(),
                       route(logits.cuda(), k, 16), k, 1.702, 7.0, tiles, fast=True)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-3, atol=2e-3)


CONFIGS = {**DECODE_CANDIDATES, **PREFILL_CANDIDATES, **LATENCY_CANDIDATES,
           **PREFILL2_CANDIDATES}
CFG_20B = ModelConfig(num_hidden_layers=1, num_experts=32)


@pytest.fixture(scope="module")
def layer_20b():  # noqa: ANN201
    return random_layer(CFG_20B, 0, seed=4, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize(  # plain launches first (a sticky CUDA error would fail the rest)
    "name", sorted(CONFIGS, key=lambda n: CONFIGS[n].pdl or CONFIGS[n].fused_router))
def test_every_candidate_config_matches_the_reference(name: str, layer_20b) -> None:  # noqa: ANN001
    cfg, layer = CFG_20B, layer_20b
    # a decode batch / ≈ 37 rows per expert
    tokens = 5 if CONFIGS[name].block_m == DECODE_CANDIDATES["d_swap128st1"].block_m else 300
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", generator=torch.Generator(
        "cuda").manual_seed(tokens)).to(torch.bfloat16)
    mc: MoEConfig = CONFIGS[name]
    plan = route(router_logits(x, layer), 4, mc.block_m)
    got = moe_experts(x, plan, prepare_moe(layer), 4, mc)
    want = experts_ref(
        x, plan.weights, plan.experts.long(), layer.mlp1_blocks, layer.mlp1_scales,
        layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
    )
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"{name}: relative error {err:.2e}"


def test_triton_kernels_backend_matches_the_reference_when_installed(layer_20b) -> None:  # noqa: ANN001
    from kernels.moe_triton_kernels import available, moe_forward_tk, prepare_moe_tk

    ok, why = available()
    if not ok:
        pytest.skip(f"triton_kernels not importable ({why})")
    x = torch.randn(37, CFG_20B.hidden_size, device="cuda", dtype=torch.bfloat16)
    got = moe_forward_tk(x, layer_20b, CFG_20B, prepare_moe_tk(layer_20b))
    plan = route(router_logits(x, layer_20b), 4, 16)
    want = experts_ref(
        x, plan.weights, plan.experts.long(), layer_20b.mlp1_blocks, layer_20b.mlp1_scales,
        layer_20b.mlp1_bias, layer_20b.mlp2_blocks, layer_20b.mlp2_scales, layer_20b.mlp2_bias,
    )
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 2e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("experts", [32, 128])
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_fused_router_matches_linear_then_route(tokens: int, experts: int) -> None:
    from kernels.moe_router import route_fused

    cfg = ModelConfig(num_hidden_layers=1, num_experts=experts)
    layer = random_layer(cfg, 0, seed=8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    for _ in range(2):  # the counter resets itself
        got = route_fused(x, layer.gate_weight, layer.gate_bias, 4, 16, counter)
    logits = router_logits(x, layer)
    want = route(logits, 4, 16)
    # bf16 logits summed in another order may differ by an ulp: compare where the top-5 is clear
    top = torch.topk(logits.float(), 5, dim=-1).values
    clear = ((top[:, :-1] - top[:, 1:]) > 0.02 * top.abs()[:, :-1].clamp(min=1)).all(-1)
    assert torch.equal(got.experts[clear], want.experts[clear])
    assert counter.item() == 0
