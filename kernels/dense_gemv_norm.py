"""The decode-size projection of a normed residual stream in one launch:

    (y, s) = norm_linear_small(x, residual, scale, eps, W, b)
    s = round(x + residual);  y = linear_small(rmsnorm(s) · scale, W, b)

kernels/dense_gemv.linear_small with its norm prologue (kernels/norm_prologue.py): each program
computes the rows' inverse rms itself and normalizes x as it loads it, so the standalone rmsnorm
launch before the attention's qkv projection goes away (≈2.5 µs per layer on the H100 at decode).
"""

from __future__ import annotations

import torch

from kernels.dense_gemv import CANDIDATES, DEFAULT, GemvDenseTiles, linear_small, linear_small_ref
from kernels.norm_prologue import norm_prologue
from kernels.rmsnorm import rmsnorm_ref


def norm_linear_small_ref(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K]
    scale: torch.Tensor,  # [K] fp32
    eps: float,
    w: torch.Tensor,  # [N, K]
    b: torch.Tensor | None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: rmsnorm_ref then linear_small_ref → ([M, N], new residual [M, K])."""
    y, s = rmsnorm_ref(x, scale, eps, residual)
    return linear_small_ref(y, w, b), s


def choose_norm_tiles(m: int, n: int, k: int) -> GemvDenseTiles:
    """The tile config with the norm prologue. The normalized x tiles need x, the residual and
    the scale per step: with the double buffer ptxas (sm_90a, qkv 5120×2880 bf16) gives 88 / 168
    / 255 registers at M = 1 / 4 / 8, spilling at 8; DEFAULT takes 64 / 126 / 221 without spills
    (python -m bench.norm_compile). Measured (H100, run 45, bench.norm_gemv, qkv, µs): at M = 1
    and 2 the 8-row tiles beat DEFAULT (13.5 vs 14.8, 15.1 vs 16.7); DEFAULT above."""
    del n, k
    return CANDIDATES["fma_n8_k512_w2"] if m <= 2 else DEFAULT


def norm_linear_small(
    x: torch.Tensor,  # [M, K] the un-normed delta (e.g. the previous block's output)
    residual: torch.Tensor | None,  # [M, K] the residual stream so far; None: x is it
    scale: torch.Tensor,  # [K] fp32
    eps: float,
    w: torch.Tensor,  # [N, K]
    b: torch.Tensor | None = None,  # [N]
    tiles: GemvDenseTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_linear_small_ref in one launch: (y [M, N], new residual [M, K]; x itself without a
    residual, as kernels/rmsnorm.rmsnorm returns it). The same bits as rmsnorm then linear_small
    when interpreted; compiled, up to the order of each row's sum of squares
    (kernels/norm_prologue.py)."""
    norm = norm_prologue(x, residual, scale, eps)
    t = tiles if tiles is not None else choose_norm_tiles(*x.shape[:1], *w.shape)
    return linear_small(x, w, b, t, norm), norm.new_residual(x)


__all__ = ["choose_norm_tiles", "norm_linear_small", "norm_linear_small_ref"]
