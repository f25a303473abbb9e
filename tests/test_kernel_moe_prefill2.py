"""Prefill tile candidates (kernels/moe_configs_prefill.py) and `GemmTiles.act_ready`
(kernels/moe_gemm_ready.py), interpreted on the CPU with fp16 activations (the fast path's
emulation).

act_ready stores the activations in the fast path's MMA column order once (x by a pass before
GEMM 1, GEMM 2's input by GEMM 1's own stores) instead of permuting every k-step's tile: the
products and the order of the sums are unchanged, so a whole layer must give the same bits as
the same tiles without it, and match the oracle. What can go wrong: the permutation of the stores
and of the x pass disagreeing with the loop's, 32-groups split by a K tail or an N block, rows
past a tile's end, experts with no rows, a layer rounding to fp16 where x was bf16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.moe import moe_experts, prepare_moe
from kernels.moe_configs import PREFILL_SA, MoEConfig, candidates
from kernels.moe_configs_prefill import PREFILL2_CANDIDATES
from kernels.moe_gemm import GemmTiles, gemm2_scale, x_ready
from kernels.moe_ref import experts_ref
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemm import case, random_mxfp4
from tests.test_kernel_moe_gemv import TOL, tiny


def plain(mc: MoEConfig) -> MoEConfig:
    """mc's tiles with the activations permuted in the loop, as before."""
    return replace(mc, gemm1=replace(mc.gemm1, act_ready=False, max_regs=None),
                   gemm2=replace(mc.gemm2, act_ready=False, max_regs=None))


def mma_position(k: int) -> int:
    """Where column k sits in MMA order (the docstring's formula, written out independently):
    k mod 32 = 8t + 2a + h, a = 2a₁ + a₀ → 16h + 8a₁ + 2t + a₀."""
    r = k % 32
    t, a, h = r // 8, (r // 2) % 4, r % 2
    return k - r + 16 * h + 8 * (a // 2) + 2 * t + a % 2


def layer_case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, block_m: int,
               seed: int, hot: int | None = None, dtype: torch.dtype = torch.float16):
    cfg = tiny(hidden, inter, experts, top_k)
    layer = random_layer(cfg, 0, seed=seed, dtype=dtype)
    _, plan = case(tokens, experts, top_k, block_m, seed=seed, hot=hot)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return layer, plan, x


def oracle(x, plan, layer):  # noqa: ANN001, ANN201
    return experts_ref(x, plan.weights, plan.experts.long(), layer.mlp1_blocks,
                       layer.mlp1_scales, layer.mlp1_bias, layer.mlp2_blocks,
                       layer.mlp2_scales, layer.mlp2_bias)


CASES = [
    # (tokens, experts, top_k, hidden, inter, hot): rows not multiples of any tile, H = 96 one
    # k64 step + a 32 tail (k128: the tail alone), every token on every expert (E = k = 4)
    (37, 4, 4, 96, 64, None),
    (23, 4, 1, 64, 96, None),  # k = 1, GEMM 2's K = 96
    (6, 8, 2, 64, 64, 3),  # 12 pairs over 8 experts, one hot: experts with no rows
    (150, 4, 1, 64, 64, 1),  # one expert's rows span two 128-row tiles
]


@pytest.mark.parametrize("name", sorted(PREFILL2_CANDIDATES))
@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "hot"), CASES)
def test_candidate_layer_matches_the_oracle_and_the_plain_tiles(
        name: str, tokens: int, experts: int, top_k: int, hidden: int, inter: int,
        hot: int | None) -> None:
    mc = PREFILL2_CANDIDATES[name]
    layer, plan, x = layer_case(tokens, experts, top_k, hidden, inter, mc.block_m, seed=tokens,
                                hot=hot)
    p = prepare_moe(layer)
    got = moe_experts(x, plan, p, top_k, mc)
    torch.testing.assert_close(got, oracle(x, plan, layer), **TOL[torch.float16])
    assert torch.equal(got, moe_experts(x, plan, p, top_k, plain(mc)))


def test_x_pass_puts_every_column_where_the_loop_and_the_stores_expect_it() -> None:
    x = torch.randn(11, 96, generator=torch.Generator().manual_seed(1))  # fp32 in → fp16 out
    xr = x_ready(x, 64)
    assert xr.dtype == torch.float16 and xr.shape == x.shape
    pos = torch.tensor([mma_position(k) for k in range(96)])
    assert sorted(pos.tolist()) == list(range(96))  # a permutation inside the row
    assert torch.equal(xr[:, pos], x.half())


def test_gemm1_stores_act_in_mma_order() -> None:
    """GEMM 1 with act_ready: the same values as without, each at its MMA-order column."""
    layer, plan, x = layer_case(20, 4, 2, 64, 96, 64, seed=5)
    p = prepare_moe(layer)
    from kernels.moe_gemm import gemm1_swiglu

    t = PREFILL2_CANDIDATES["p2_sa_ready"].gemm1
    ready = gemm1_swiglu(x, p.w1, p.s1, p.b1, plan, 2, 1.702, 7.0, t, fast=True)
    before = gemm1_swiglu(x, p.w1, p.s1, p.b1, plan, 2, 1.702, 7.0, plain_tiles(t), fast=True)
    pos = torch.tensor([mma_position(k) for k in range(96)])
    assert torch.equal(ready[:, pos], before)


def plain_tiles(t: GemmTiles) -> GemmTiles:
    return replace(t, act_ready=False, max_regs=None)


def test_bf16_x_still_rounds_the_matmul_to_bf16() -> None:
    """x goes to the MMA as fp16 either way; h is rounded to x's dtype before the bias, as the
    reference does — with act_ready the x pass's fp16 must not change that (RND_BF16)."""
    layer, plan, x = layer_case(20, 4, 2, 64, 64, 64, seed=6, dtype=torch.bfloat16)
    p = prepare_moe(layer)
    mc = PREFILL2_CANDIDATES["p2_sa_ready"]
    # the interpreter's dot is wrong on bf16 operands, but the fast path's are fp16 on both
    # sides: only the rounding of h and of the output depends on x's dtype
    assert torch.equal(moe_experts(x, plan, p, 2, mc), moe_experts(x, plan, p, 2, plain(mc)))


def test_exact_path_ignores_act_ready() -> None:
    """fp32 activations take the exact path in both GEMMs: nothing is permuted anywhere."""
    layer, plan, x = layer_case(20, 4, 2, 64, 64, 64, seed=7, dtype=torch.float32)
    p = prepare_moe(layer)
    mc = PREFILL2_CANDIDATES["p2_sa_ready"]
    got = moe_experts(x, plan, p, 2, mc)
    assert torch.equal(got, moe_experts(x, plan, p, 2, plain(mc)))
    torch.testing.assert_close(got, oracle(x, plan, layer), **TOL[torch.float32])


def test_act_ready_needs_whole_32_groups() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        x_ready(torch.zeros(3, 80, dtype=torch.float16), 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        x_ready(torch.zeros(3, 64, dtype=torch.float16), 80)
    g, plan = case(8, 4, 2, 64, seed=8)  # (model configs hold whole groups: raw weights here)
    w2, s2 = random_mxfp4(g, 4, 64, 80)
    act = torch.zeros(16, 80, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm2_scale(act, w2, s2, torch.zeros(4, 64), plan,
                    PREFILL2_CANDIDATES["p2_sa_ready"].gemm2, True)


def test_options_are_off_by_default_and_checked() -> None:
    t = GemmTiles(128, 64)
    assert t.act_ready is False and t.max_regs is None
    assert not PREFILL_SA.gemm1.act_ready and PREFILL_SA.gemm1.max_regs is None
    with pytest.raises(ValueError, match="max_regs"):
        GemmTiles(128, 64, max_regs=300)


def test_candidates_agree_on_act_ready_and_reach_the_sweep_at_prefill_sizes() -> None:
    for name, mc in PREFILL2_CANDIDATES.items():
        assert name.startswith("p2_")
        assert mc.gemm1.act_ready == mc.gemm2.act_ready  # GEMM 1 writes what GEMM 2 reads
    assert set(PREFILL2_CANDIDATES) <= set(candidates(4096, 4, 32))  # 512 rows per expert
    assert set(PREFILL2_CANDIDATES) <= set(candidates(512, 4, 32))  # 64
    assert not set(PREFILL2_CANDIDATES) & set(candidates(256, 4, 32))  # 32
