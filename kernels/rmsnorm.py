"""RMSNorm fused with the residual add.

    s = x + residual                      (rounded to the activation dtype: it is the residual stream)
    y = s · rsqrt(mean(s²) + eps) · scale (computed in fp32, scale fp32, y in the activation dtype)

The Triton kernel runs one program per row: it reads x and residual once, writes s and y once
(memory bound: 3 or 4 passes of T·H elements).
Zhang & Sennrich, "Root Mean Square Layer Normalization", https://arxiv.org/abs/1910.07467
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet

jit = KernelSet(globals())


def rmsnorm_ref(
    x: torch.Tensor,  # [T, H]
    scale: torch.Tensor,  # [H] fp32
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,  # [T, H]; when given, x + residual is normalized
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normalized [T, H], new residual stream [T, H])."""
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(dim=-1, keepdim=True) + eps) * scale.float()
    return y.to(x.dtype), s


@jit
def _rmsnorm_kernel(
    X, R, S, Y, W, stride_x, stride_r, stride_s, stride_y, H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream's rounding
        tl.store(S + row * stride_s + cols, s, mask=mask)
    else:
        s = x
    sf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, (sf * inv * w).to(Y.dtype.element_ty), mask=mask)


def rmsnorm(
    x: torch.Tensor,  # [T, H]
    scale: torch.Tensor,  # [H] fp32
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rmsnorm_ref: (normalized [T, H], new residual [T, H]); without a residual the
    second result is x itself, as in the reference."""
    if x.dim() != 2:
        raise ValueError(f"rmsnorm: x must be [T, H], got shape {tuple(x.shape)}")
    t, h = x.shape
    if scale.shape != (h,) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(
            f"rmsnorm: scale must be contiguous fp32 [{h}], got {scale.dtype} {tuple(scale.shape)}"
        )
    if x.stride(1) != 1:
        raise ValueError("rmsnorm: x rows must be contiguous (stride(1) == 1)")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
    ):
        raise ValueError(
            f"rmsnorm: residual must match x ({x.dtype} {tuple(x.shape)}, unit column stride), "
            f"got {residual.dtype} {tuple(residual.shape)} strides {residual.stride()}"
        )
    for name, tensor in (("scale", scale), ("residual", residual)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"rmsnorm: {name} on {tensor.device}, x on {x.device}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = x if residual is None else torch.empty_like(y)
    if t == 0:
        return y, s
    r = residual if residual is not None else x
    block = triton.next_power_of_2(h)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
    jit["_rmsnorm_kernel"][(t,)](
        x, r, s, y, scale, x.stride(0), r.stride(0), s.stride(0), y.stride(0), h, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return y, s
