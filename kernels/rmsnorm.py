"""RMSNorm fused with the residual add.

    s = x + residual                      (rounded to the activation dtype: it is the residual stream)
    y = s · rsqrt(mean(s²) + eps) · scale (computed in fp32, scale fp32, y in the activation dtype)

Zhang & Sennrich, "Root Mean Square Layer Normalization", https://arxiv.org/abs/1910.07467
"""

from __future__ import annotations

import torch


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
