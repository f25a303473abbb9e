"""Decode tile candidates (kernels/moe_configs_decode2.py: 256-row weight tiles, 8 warps, 2-3
pipeline stages), interpreted on the CPU with fp16 activations: a whole layer matches the oracle
with rows that fill no tile, experts with no rows, k = 1 and a K tail; the sweep offers them for
decode-sized batches only."""

from __future__ import annotations

import pytest
import torch

from kernels.moe import moe_experts, prepare_moe
from kernels.moe_configs import candidates
from kernels.moe_configs_decode2 import DECODE2_CANDIDATES
from tests.test_kernel_moe_gemv import TOL
from tests.test_kernel_moe_prefill2 import layer_case, oracle

CASES = [
    # (tokens, experts, top_k, hidden, inter, hot)
    (7, 4, 4, 96, 64, None),  # every token on every expert; H = 96: a k64 step and a tail
    (5, 8, 2, 64, 96, 3),  # one hot expert, others with no rows; GEMM 2's K = 96
    (19, 4, 1, 64, 64, None),  # k = 1, an expert's rows over two 16-row tiles
]


@pytest.mark.parametrize("name", sorted(DECODE2_CANDIDATES))
@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "hot"), CASES)
def test_decode2_candidate_layer_matches_the_oracle(name: str, tokens: int, experts: int,
                                                    top_k: int, hidden: int, inter: int,
                                                    hot: int | None) -> None:
    mc = DECODE2_CANDIDATES[name]
    layer, plan, x = layer_case(tokens, experts, top_k, hidden, inter, mc.block_m, seed=tokens,
                                hot=hot)
    got = moe_experts(x, plan, prepare_moe(layer), top_k, mc)
    torch.testing.assert_close(got, oracle(x, plan, layer), **TOL[torch.float16])


def test_the_sweep_offers_them_for_decode_batches_only() -> None:
    assert set(DECODE2_CANDIDATES) <= set(candidates(64, 4, 32))  # 8 rows per expert
    assert not set(DECODE2_CANDIDATES) & set(candidates(4096, 4, 32))  # 512 rows
