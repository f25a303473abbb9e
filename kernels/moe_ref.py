"""Reference mixture-of-experts layer of gpt-oss (torch; the CPU path and the kernels' oracle).

    logits = x·Wgᵀ + bg                         router, [T, E]
    (v, e) = top-k(logits);  w = softmax(v)     k experts per token, weights over the k selected
    h      = W1[e]·x + b1[e]                    [2I]; gate = h[0::2], linear = h[1::2] (interleaved)
    g      = min(gate, L);  u = clamp(linear, −L, L)
    a      = g·σ(α·g) · (u + 1)                 α = 1.702, L = 7
    y      = Σₖ wₖ · (W2[eₖ]·a + b2[eₖ])
W1, W2 are MXFP4 (runtime/mxfp4.py): only the experts a batch hits are dequantized.
Switch/GShard MoE: https://arxiv.org/abs/2101.03961
"""

from __future__ import annotations

import torch

from runtime.mxfp4 import dequantize


def route_ref(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    gate_bias: torch.Tensor,  # [E]
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [T, k] fp32, expert ids [T, k] int64), ids sorted by logit, largest first."""
    logits = torch.nn.functional.linear(x, gate_weight.to(x.dtype), gate_bias.to(x.dtype))
    values, experts = torch.topk(logits, top_k, dim=-1, sorted=True)
    return torch.softmax(values.float(), dim=-1), experts


def swiglu_ref(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[.., 2I] interleaved gate/linear (fp32) → [.., I]."""
    gate, linear = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def experts_ref(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] fp32
    experts: torch.Tensor,  # [T, k]
    mlp1_blocks: torch.Tensor,  # [E, 2I, H/32, 16] u8
    mlp1_scales: torch.Tensor,  # [E, 2I, H/32] u8
    mlp1_bias: torch.Tensor,  # [E, 2I] fp32
    mlp2_blocks: torch.Tensor,  # [E, H, I/32, 16] u8
    mlp2_scales: torch.Tensor,  # [E, H, I/32] u8
    mlp2_bias: torch.Tensor,  # [E, H] fp32
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Weighted sum of the selected experts' outputs, [T, H] in x's dtype (fp32 accumulation)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # Compute in the activation dtype's precision (fp32 when x is fp32), accumulate in fp32.
    for e in torch.unique(experts).tolist():
        tok, kth = torch.nonzero(experts == e, as_tuple=True)
        w1 = dequantize(mlp1_blocks[e], mlp1_scales[e], x.dtype)  # [2I, H]
        w2 = dequantize(mlp2_blocks[e], mlp2_scales[e], x.dtype)  # [H, I]
        h = (x[tok] @ w1.T).float() + mlp1_bias[e].float()  # [n, 2I]
        a = swiglu_ref(h, alpha, limit).to(x.dtype)  # [n, I]
        y = (a @ w2.T).float() + mlp2_bias[e].float()  # [n, H]
        out.index_add_(0, tok, y * weights[tok, kth, None])
    return out.to(x.dtype)


def moe_ref(
    x: torch.Tensor,  # [T, H] (normalized)
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    mlp1_blocks: torch.Tensor,
    mlp1_scales: torch.Tensor,
    mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor,
    mlp2_scales: torch.Tensor,
    mlp2_bias: torch.Tensor,
    top_k: int,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    weights, experts = route_ref(x, gate_weight, gate_bias, top_k)
    return experts_ref(
        x, weights, experts, mlp1_blocks, mlp1_scales, mlp1_bias,
        mlp2_blocks, mlp2_scales, mlp2_bias, alpha, limit,
    )
