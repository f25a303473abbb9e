"""Optional MoE backend on `triton_kernels` (matmul_ogs), for comparison with kernels/moe.py.

Same math as kernels/moe_ref.moe_ref: router logits (torch), triton_kernels' routing (top-k then
softmax over the k), matmul_ogs with the weights' MXFP4 scales, swiglu fused into the first GEMM
(gate/linear interleaved), router weights and the scatter-sum fused into the second.

triton_kernels is not on PyPI and is never committed here: the vllm wheel vendors the version
that matches triton 3.6 (vllm/third_party/triton_kernels). Extract that folder anywhere and put
its parent on PYTHONPATH (bench/gpu_moe.sh: TRITON_KERNELS_PATH=...). Its API moves between
versions; this adapter follows the one openai/gpt-oss's triton reference and vLLM use, and
`available()` says why it cannot run when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.moe import router_logits
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights


def available() -> tuple[bool, str]:
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
        import triton_kernels.routing  # noqa: F401
        import triton_kernels.swiglu  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@dataclass
class TKPrepared:
    w1: Any  # triton_kernels Tensor, [E, H, 2I] FP4 (K-major, swizzled for the GPU)
    w1_scale: Any
    b1: torch.Tensor  # [E, 2I] fp32
    w2: Any  # [E, I, H]
    w2_scale: Any
    b2: torch.Tensor  # [E, H] fp32


def _layouts(num_warps: int = 8) -> tuple[Any, dict, Any, dict]:
    from triton_kernels.tensor_details import layout

    def unpack(made: Any) -> tuple[Any, dict]:
        return made if isinstance(made, tuple) else (made, {})

    value = unpack(layout.make_default_matmul_mxfp4_w_layout(mx_axis=1))
    try:
        scale = unpack(layout.make_default_matmul_mxfp4_w_scale_layout(mx_axis=1,
                                                                       num_warps=num_warps))
    except (AttributeError, TypeError):
        scale = (layout.StridedLayout, {})
    return value[0], value[1], scale[0], scale[1]


def _swizzle(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[Any, Any]:
    """[E, N, K/32, 16] codes + [E, N, K/32] exponents → triton_kernels tensors with the MX
    axis (K) on dim 1, as matmul_ogs wants its weights ([E, K, N])."""
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor

    e, n, g, _ = blocks.shape
    codes = blocks.reshape(e, n, g * 16).transpose(-2, -1)  # [E, K/2, N]
    exps = scales.transpose(-2, -1)  # [E, K/32, N]
    v_layout, v_opts, s_layout, s_opts = _layouts()
    w = convert_layout(wrap_torch_tensor(codes, dtype=FP4), v_layout, **v_opts)
    s = convert_layout(wrap_torch_tensor(exps), s_layout, **s_opts)
    return w, s


def prepare_moe_tk(layer: LayerWeights) -> TKPrepared:
    w1, s1 = _swizzle(layer.mlp1_blocks, layer.mlp1_scales)
    w2, s2 = _swizzle(layer.mlp2_blocks, layer.mlp2_scales)
    return TKPrepared(w1, s1, layer.mlp1_bias.float().contiguous(), w2, s2,
                      layer.mlp2_bias.float().contiguous())


def moe_forward_tk(x: torch.Tensor, layer: LayerWeights, config: ModelConfig,
                   prepared: TKPrepared) -> torch.Tensor:
    """x [T, H] bf16 → [T, H], via triton_kernels."""
    import triton_kernels.swiglu
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, PrecisionConfig, matmul_ogs
    from triton_kernels.routing import routing

    if x.shape[0] == 0:
        return torch.empty_like(x)
    p = prepared
    logits = router_logits(x, layer)
    rdata, gather, scatter = routing(logits, config.experts_per_token, sm_first=False)
    act = FusedActivation(
        FnSpecs("swiglu", triton_kernels.swiglu.swiglu_fn, ("alpha", "limit")),
        (config.swiglu_alpha, config.swiglu_limit), 2,
    )
    h = matmul_ogs(x, p.w1, p.b1, rdata, gather_indx=gather,
                   precision_config=PrecisionConfig(weight_scale=p.w1_scale), fused_activation=act)
    return matmul_ogs(h, p.w2, p.b2, rdata, scatter_indx=scatter,
                      precision_config=PrecisionConfig(weight_scale=p.w2_scale),
                      gammas=rdata.gate_scal)
