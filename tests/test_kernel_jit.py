"""kernels/jit.py: the batch-size arguments of the kernels are compiled unspecialized."""

from __future__ import annotations

import pytest
import triton.language as tl

from kernels import moe_gemm_kernels, moe_gemv, moe_router, moe_routing
from kernels.jit import KernelSet


def test_naming_an_unknown_argument_is_an_error_at_import() -> None:
    ks = KernelSet({})
    with pytest.raises(TypeError, match="unknown arguments"):
        @ks(do_not_specialize=("T", "ROWS"))
        def _kernel(X, T, N: tl.constexpr):  # noqa: ANN001, ANN202, N803
            pass


@pytest.mark.parametrize(("module", "kernel", "args"), [
    (moe_routing, "_topk_kernel", {"T", "MAX_TILES"}),
    (moe_routing, "_place_kernel", {"nblocks", "TK", "MAX_TILES"}),
    (moe_router, "_router_kernel", {"T", "MAX_TILES"}),
    (moe_gemm_kernels, "_gemm1_swiglu_kernel", {"MAX_TILES"}),
    (moe_gemm_kernels, "_gemm2_scale_kernel", {"T", "ROWS", "MAX_TILES", "stride_split"}),
    (moe_gemm_kernels, "_combine_kernel", {"T", "stride_split"}),
    (moe_gemv, "_gemv1_swiglu_kernel", {"n_pairs"}),
    (moe_gemv, "_gemv2_kernel", {"n_pairs", "stride_ps"}),
    (moe_gemv, "_gemv_combine_kernel", {"stride_ps"}),
])
def test_token_count_arguments_reach_triton_unspecialized(module, kernel, args) -> None:  # noqa: ANN001
    """Each of these changes with the step's token count; specialized, every new count class
    would compile a new variant while serving."""
    compiled = module.jit.bound(False)[kernel]  # the triton.jit function the GPU launches
    unspecialized = {p.name for p in compiled.params if p.do_not_specialize}
    assert args <= unspecialized
