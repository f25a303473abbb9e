"""The block-parallel MoE routing (kernels/moe_routing_par.py): the same plan as the routing before
it (kernels/moe_routing.route), bit for bit, and as the torch oracle; the layer's output bits do
not depend on which routing or combine placement a config picks. CPU tensors run interpreted;
the last tests need an H100 (pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from kernels import moe_routing_par
from kernels.moe import moe_forward, moe_forward_ref, prepare_moe, router_logits
from kernels.moe_configs import MIDDLE_SA, MoEConfig, choose_config, previous_routing
from kernels.moe_gemm import GemmTiles
from kernels.moe_routing import RoutingPlan, max_tiles, route, route_plan_ref
from kernels.moe_routing_par import ParLaunch, route_par
from runtime.config import ModelConfig
from runtime.synthetic import random_layer
from tests.test_kernel_moe_routing import assert_consistent, assert_same_plan

FIELDS = ("weights", "experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start",
          "tile_end", "num_tiles")


def assert_bit_equal(got: RoutingPlan, want: RoutingPlan) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    assert got.block_m == want.block_m


@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k", "block_m"),
    [
        (1, 4, 1, 16),  # one decode token, k = 1, one launch
        (5, 4, 4, 16),  # k = E: every token on every expert
        (37, 32, 4, 16),  # two token blocks, the second partial
        (33, 32, 4, 64),  # a block of one token
        (300, 32, 4, 32),  # 10 blocks, counts not multiples of the tile
        (300, 32, 1, 128),  # k = 1: 128-token blocks
        (70, 128, 4, 16),  # E = 128, most experts empty
        (300, 128, 4, 64),
        (29, 128, 3, 32),  # k not a power of two: the last ranking step is partial
        (100, 32, 3, 16),  # … over several blocks
        (1100, 128, 4, 64),  # more blocks than one load of the counts holds (35 > 32)
    ],
)
def test_parallel_routing_gives_the_previous_plan_bit_for_bit(
    tokens: int, num_experts: int, top_k: int, block_m: int
) -> None:
    g = torch.Generator().manual_seed(tokens * 1000 + num_experts + top_k)
    logits = torch.randn(tokens, num_experts, generator=g)
    plan = route_par(logits, top_k, block_m)
    assert_bit_equal(plan, route(logits, top_k, block_m))
    assert_same_plan(plan, route_plan_ref(logits, top_k, block_m))
    assert_consistent(plan, tokens, top_k, num_experts)
    assert plan.max_tiles == max_tiles(tokens, top_k, num_experts, block_m)


@pytest.mark.parametrize("top_k", [1, 4])
def test_every_token_first_on_one_expert_and_empty_experts(top_k: int) -> None:
    logits = torch.randn(90, 32, generator=torch.Generator().manual_seed(top_k))
    logits[:, 7] += 100.0
    logits[:, 20:] -= 100.0  # experts 20… never chosen
    plan = route_par(logits, top_k, 16)
    assert_bit_equal(plan, route(logits, top_k, 16))
    assert plan.counts[7].item() == 90 and plan.counts[20:].sum().item() == 0
    start = int(plan.counts[:7].sum())
    rows = plan.sorted_pair[start:start + 90].long()
    assert torch.equal(rows, torch.arange(90) * top_k)  # stable: token order within expert 7
    assert_consistent(plan, 90, top_k, 32)


def test_equal_logits_prefer_the_lower_expert_id_in_every_block() -> None:
    logits = torch.zeros(70, 6, dtype=torch.float16)  # 70 tokens: several blocks of ties
    logits[1, 4] = 1.0
    plan = route_par(logits, 2, 16)
    assert plan.experts[1].tolist() == [4, 0]
    assert plan.experts[0].tolist() == [0, 1] and plan.experts[69].tolist() == [0, 1]
    assert_bit_equal(plan, route(logits, 2, 16))


def test_no_tokens_gives_an_empty_plan() -> None:
    plan = route_par(torch.empty(0, 16), 4, 16)
    assert plan.counts.tolist() == [0] * 16 and plan.num_tiles.tolist() == [0]
    assert plan.pos.numel() == 0 and plan.max_tiles == 0


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="top_k"):
        route_par(torch.randn(2, 4), 5, 16)
    with pytest.raises(ValueError, match="power of two"):
        route_par(torch.randn(2, 4), 2, 24)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route_par(torch.randn(2, 4, 1), 2, 16)
    with pytest.raises(ValueError, match="routing"):
        MoEConfig(16, GemmTiles(32, 64), GemmTiles(32, 64), routing="fast")


def test_plan_fields_are_16_byte_aligned_views_and_blocks_stay_small() -> None:
    plan = route_par(torch.randn(45, 32), 4, 16)
    for name in FIELDS:
        assert getattr(plan, name).data_ptr() % 16 == 0, name  # the GEMMs' pointer specialization
    for t, e, k in ((4096, 32, 4), (4096, 128, 4), (4096, 32, 1), (7, 128, 3)):
        lc = ParLaunch.of(t, e, k, 64)
        assert lc.block_t * k <= 128 and lc.block_t * lc.e_pad <= 4096
        assert lc.nblocks * lc.block_t >= t


def test_token_count_arguments_reach_triton_unspecialized() -> None:
    """Specialized, every new token-count class would compile a new variant while serving."""
    bound = moe_routing_par.jit.bound(False)
    for kernel, args in (("_topk_count_kernel", {"T", "MAX_TILES"}),
                         ("_rank_kernel", {"nblocks", "TK", "MAX_TILES"})):
        assert args <= {p.name for p in bound[kernel].params if p.do_not_specialize}, kernel


def tiny(experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_experts=experts, experts_per_token=top_k)


def test_layer_output_bits_do_not_depend_on_routing_or_combine_placement() -> None:
    """70 tokens: past fused_combine_max_tokens, so the default combines in its own launch
    while the previous routing fuses it into GEMM 2; both equal the oracle."""
    cfg = tiny(8, 2)
    layer = random_layer(cfg, 0, seed=3, dtype=torch.float16)
    prepared = prepare_moe(layer)
    x = torch.randn(70, 32, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    mc = MoEConfig(32, GemmTiles(32, 32, swap_ab=True), GemmTiles(32, 32, swap_ab=True),
                   fuse_combine=True)
    assert not mc.fuses_combine(70) and previous_routing(mc).fuses_combine(70)
    got = moe_forward(x, layer, cfg, prepared, mc)
    assert torch.equal(got, moe_forward(x, layer, cfg, prepared, previous_routing(mc)))
    torch.testing.assert_close(got, moe_forward_ref(x, layer, cfg), rtol=3e-3, atol=3e-3)


def test_defaults_route_in_parallel_and_fuse_the_combine_only_for_small_batches() -> None:
    assert choose_config(256, 4, 32).routing == "par"
    assert MIDDLE_SA.fuses_combine(64) and not MIDDLE_SA.fuses_combine(65)
    assert previous_routing(MIDDLE_SA).fuses_combine(4096)


# ---- GPU, real shapes ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("experts", [32, 128])
@pytest.mark.parametrize("tokens", [1, 31, 64, 256, 512, 1000, 2048, 4096])
def test_gpu_parallel_routing_gives_the_previous_plan(experts: int, tokens: int) -> None:
    """Compiled kernels: the same bits as the previous routing (the softmax sums too), and a
    CUDA-graph replay the same as eager."""
    cfg = ModelConfig(num_hidden_layers=1, num_experts=experts)
    layer = random_layer(cfg, 0, seed=tokens, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    logits = router_logits(x, layer)
    bm = choose_config(tokens, 4, experts).block_m
    plan = route_par(logits, 4, bm)
    assert_bit_equal(plan, route(logits, 4, bm))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route_par(logits, 4, bm)
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_equal(captured, plan)
