"""GEMV 2 shapes for one token (kernels/moe_configs_gemv2one.py): GEMV_ONE with other GEMM 2 tiles.

CPU, interpreted. Each candidate must give the oracle's layer (fused router, both GEMVs, the
combine folded into GEMM 2), keep the fenced f16 step's bits (the fence ORs a zero), change
nothing but GEMM 2's tiles, and be swept at one token without becoming a default.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.moe import choose_config, moe_forward, moe_forward_ref, prepare_moe
from kernels.moe_configs import candidates
from kernels.moe_configs_gemv import GEMV_ONE
from kernels.moe_configs_gemv2one import GEMV2ONE_CANDIDATES
from kernels.moe_gemv import moe_gemv
from runtime.synthetic import random_layer
from tests.test_kernel_moe_gemv import TOL, tiny
from tests.test_kernel_moe_gemv_mlp import routed

NAMES = sorted(GEMV2ONE_CANDIDATES)
# I = 1056 (33 groups): every candidate's GEMM 2 runs a whole step and a partial one per split
# (k512 unsplit: 2 + 1 group; k512 split 2: 17 groups; k256 split 4: 9 groups, the last 6); H = 96:
# several N blocks of 16 and 32 rows; top-4 of 8 experts as 20b's top-4 of 32.
HIDDEN, INTER, EXPERTS, TOP_K = 96, 1056, 8, 4


def _layer(dtype: torch.dtype, tokens: int):
    cfg = tiny(HIDDEN, INTER, EXPERTS, TOP_K)
    layer = random_layer(cfg, 0, seed=5 + tokens, dtype=dtype)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    return cfg, layer, x


# (kept to one case per candidate plus the folded combine's: each is ≈ 15 s interpreted in CI)
CASES = [pytest.param(name, torch.float16, 1, id=f"{name}-fp16-1") for name in NAMES] + [
    pytest.param("g8_n32k256s4", torch.float16, 3, id="g8_n32k256s4-fp16-3"),
]


@pytest.mark.parametrize(("name", "dtype", "tokens"), CASES)
def test_candidates_give_the_oracles_layer(name: str, dtype: torch.dtype, tokens: int) -> None:
    """fp16: the fenced f16 step; 3 tokens: the folded combine sums several tokens per block."""
    cfg, layer, x = _layer(dtype, tokens)
    got = moe_forward(x, layer, cfg, prepare_moe(layer), GEMV2ONE_CANDIDATES[name])
    want = moe_forward_ref(x, layer, cfg)
    assert prepare_moe(layer).gemv_ok  # the GEMV path, not the tile fallback
    assert got.shape == x.shape and got.dtype == dtype
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("name", ["g8_n16k512s1"])  # the fence's code is shared by all three
def test_the_fence_keeps_the_plain_f16_steps_bits(name: str) -> None:
    """Same tiles without loads_first: bit-equal outputs (the fence only ORs a zero)."""
    cfg, layer, x = _layer(torch.float16, 1)
    g = GEMV2ONE_CANDIDATES[name].gemv
    assert g is not None
    plain = replace(g, gemm1=replace(g.gemm1, loads_first=False),
                    gemm2=replace(g.gemm2, loads_first=False))
    ids, w = routed(1, EXPERTS, TOP_K, seed=11)
    p = prepare_moe(layer)
    args = (x, ids, w, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2)
    fenced = moe_gemv(*args, g)
    assert torch.isfinite(fenced).all() and fenced.abs().sum() > 0
    assert torch.equal(fenced, moe_gemv(*args, plain))


def test_only_gemm2_differs_from_gemv_one() -> None:
    base = GEMV_ONE.gemv
    assert base is not None
    for name, mc in GEMV2ONE_CANDIDATES.items():
        assert mc.gemv is not None and mc.gemv.gemm2 != base.gemm2, name
        assert replace(mc, gemv=replace(mc.gemv, gemm2=base.gemm2)) == GEMV_ONE, name
        assert mc.gemv.gemm2.loads_first and mc.gemv.gemm2.dequant == "f16", name


def test_swept_at_one_token_and_not_a_default() -> None:
    assert set(NAMES) <= set(candidates(1, 4, 32))  # bench.moe --sweep at one 20b token
    assert set(NAMES) <= set(candidates(1, 4, 128))  # and 120b
    assert choose_config(1, 4, 32) is GEMV_ONE
    assert all(choose_config(1, 4, 32) is not mc for mc in GEMV2ONE_CANDIDATES.values())
