"""The norm-prologue kernels compile for the H100 (sm_90a) on the CPU without spilling, at the
gpt-oss shapes and the tiles a launch picks (bench/norm_compile.py; no GPU needed)."""

from __future__ import annotations

import pytest

from bench.norm_compile import compile_dense, compile_router, usage


@pytest.mark.parametrize("m", [1, 8])
def test_fused_qkv_gemv_compiles_without_spills(m: int) -> None:
    for res, scale in ((True, "bf16"), (True, "fp32"), (False, "fp32")):
        regs, spill = usage(compile_dense(m, norm=True, res=res, scale=scale))
        assert spill == 0, (res, scale, regs)


def test_fused_router_compiles_without_spills() -> None:
    for tokens in (1, 8):
        regs, spill = usage(compile_router(tokens, 32, norm=True, res=True))
        assert spill == 0, (tokens, regs)
