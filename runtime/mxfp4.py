"""MXFP4 (OCP microscaling FP4): groups of 32 e2m1 values sharing one e8m0 power-of-two scale.

Storage (DESIGN §3): `blocks [..., G, 16] u8` holds 32 4-bit codes per group, low nibble first;
`scales [..., G] u8` holds the biased exponent, value = fp4(code) · 2^(scale − 127).
FP4 codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; codes 8..15 are the same negated (8 is −0).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32
SCALE_BIAS = 127


def fp4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[..., G, 16] u8 codes + [..., G] u8 exponents → [..., G·32] values."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 shapes disagree: blocks {tuple(blocks.shape)} vs scales {tuple(scales.shape)}"
        )
    table = fp4_table(blocks.device)
    lo = (blocks & 0x0F).long()
    hi = (blocks >> 4).long()
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32], low nibble first
    values = table[codes]
    exp = scales.to(torch.int32) - SCALE_BIAS  # [..., G]
    values = torch.ldexp(values, exp.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def quantize(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float (K a multiple of 32) → ([..., K/32, 16] u8, [..., K/32] u8), round to nearest.

    The shared exponent is the smallest one that keeps the group's largest magnitude within ±6.
    """
    if weights.shape[-1] % GROUP:
        raise ValueError(f"last dimension {weights.shape[-1]} is not a multiple of {GROUP}")
    w = weights.detach().to(torch.float32).contiguous()
    groups = w.unflatten(-1, (-1, GROUP))  # [..., G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., G]
    # exponent e with amax / 2^e <= 6; all-zero groups get the smallest scale.
    exp = torch.ceil(torch.log2(torch.clamp(amax, min=2.0**-126) / 6.0))
    exp = torch.clamp(exp, -SCALE_BIAS, 255 - SCALE_BIAS - 1)
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    mids = (mags[1:] + mags[:-1]) / 2
    # nearest magnitude; bucketize puts a tie on the lower neighbour, and round-to-nearest-even
    # moves it up where the lower code is odd.
    idx = torch.bucketize(scaled.abs(), mids, right=False)
    at_tie = (idx < 7) & (scaled.abs() == mids[idx.clamp(max=6)])
    idx = torch.where(at_tie & (idx % 2 == 1), idx + 1, idx).clamp(0, 7)
    codes = idx | (torch.signbit(scaled).to(torch.long) << 3)
    codes = codes.to(torch.uint8).unflatten(-1, (16, 2))  # [..., G, 16, 2]
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
