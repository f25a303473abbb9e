"""RMSNorm (with its residual add) as the prologue of the kernel that consumes the normed rows.

    s = round(x + residual)                       the new residual stream (s = x without residual)
    y = round(fp32(s) · inv · scale),  inv = 1 / sqrt(Σ s² / K + eps)

the math of kernels/rmsnorm.py, for decode batches (a few rows): every program of the consumer
(the dense GEMV, the fused router) first computes each row's inverse rms from whole rows of x and
the residual (L2-resident: M·K·2 elements), then normalizes its x tiles as it loads them, rounded
to the activation dtype as the standalone kernel rounds y. One program writes s into a separate
buffer (never in place: the others read the residual concurrently), so a decode step saves the
norm's launch.

Each row's sum of squares is one reduction over a [BLOCK] vector of the whole row (zeros past K),
the standalone kernel's expression, so interpreted (NumPy sums) the two agree bit for bit. Compiled,
the reduction's order follows the tensor layout (num_warps), which may differ from the standalone
kernel's: inv can then differ in its last fp32 bit, and a rare y element by one ulp of its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet
from kernels.rmsnorm import rmsnorm_ref

jit = KernelSet(globals())


@dataclass(frozen=True)
class NormPrologue:
    """What a consumer kernel needs to normalize its x [M, K] itself."""

    scale: torch.Tensor  # [K] fp32, or a copy in x's dtype that holds its values exactly
    eps: float
    residual: torch.Tensor | None = None  # [M, K] x's dtype; None: s = x (the first layer)
    resid_out: torch.Tensor | None = None  # [M, K] gets s; given exactly when residual is

    def __post_init__(self) -> None:
        if (self.scale.dim() != 1 or not self.scale.is_floating_point()
                or self.scale.stride(0) != 1):
            raise ValueError(f"NormPrologue: scale must be a contiguous float [K], got "
                             f"{self.scale.dtype} {tuple(self.scale.shape)}")
        if not self.eps >= 0.0:
            raise ValueError(f"NormPrologue: eps must be ≥ 0, got {self.eps}")
        if (self.residual is None) != (self.resid_out is None):
            raise ValueError("NormPrologue: resid_out is given exactly when residual is")
        if self.residual is None or self.resid_out is None:
            return
        r, out = self.residual, self.resid_out
        if out.shape != r.shape or out.dtype != r.dtype or out.device != r.device:
            raise ValueError(f"NormPrologue: resid_out must match residual "
                             f"({r.dtype} {tuple(r.shape)}), got {out.dtype} {tuple(out.shape)}")
        if overlap(out, r):
            raise ValueError("NormPrologue: resid_out must not overlap residual (other programs "
                             "read the residual while one writes s)")

    def check(self, x: torch.Tensor, who: str) -> None:
        """Raises unless this prologue fits x [M, K] (what the consumer kernel assumes)."""
        k = x.shape[1]
        if (self.scale.shape != (k,) or self.scale.device != x.device
                or self.scale.dtype not in (torch.float32, x.dtype)):
            raise ValueError(f"{who}: norm scale must be fp32 or {x.dtype} [{k}] on {x.device}, "
                             f"got {self.scale.dtype} {tuple(self.scale.shape)} on "
                             f"{self.scale.device}")
        for name in ("residual", "resid_out"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.shape != x.shape or t.dtype != x.dtype or t.stride(1) != 1 or t.device != x.device:
                raise ValueError(f"{who}: norm {name} must be {x.dtype} {tuple(x.shape)} with "
                                 f"contiguous rows on {x.device}, got {t.dtype} {tuple(t.shape)} "
                                 f"strides {t.stride()} on {t.device}")
        if self.resid_out is not None and overlap(self.resid_out, x):
            raise ValueError(f"{who}: norm resid_out must not overlap x")

    def launch_args(self, x: torch.Tensor) -> tuple:
        """(R, SC, S_OUT, stride_r, stride_s, eps) for the kernels; x stands in when absent."""
        r = self.residual if self.residual is not None else x
        s = self.resid_out if self.resid_out is not None else x
        return r, self.scale, s, r.stride(0), s.stride(0), float(self.eps)

    def new_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the add: resid_out, or x itself without a residual (as
        kernels/rmsnorm.rmsnorm returns it)."""
        return self.resid_out if self.resid_out is not None else x


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses the tensor's elements can touch."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + t.element_size() * (1 + last)


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory spans intersect (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def norm_prologue(x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor,
                  eps: float) -> NormPrologue:
    """A prologue with a fresh resid_out (when there is a residual) for x [M, K]."""
    out = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return NormPrologue(scale, eps, residual, out)


def exact_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """scale [K] fp32 in dtype when that holds every value exactly (checkpoint norms are stored
    in bf16), else None. The same products in the prologue, and the dense GEMV loads it as it
    loads x: an fp32 tile costs registers (qkv at M = 1: 64 vs 56) and from M = 2 a trip through
    shared memory per step into x's layout (python -m bench.norm_compile). One host sync: call
    at load, not per step."""
    narrow = scale.to(dtype)
    return narrow.contiguous() if torch.equal(narrow.float(), scale.float()) else None


def normed_ref(x: torch.Tensor, norm: NormPrologue) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of the prologue: (y [M, K], s [M, K]) as kernels/rmsnorm.rmsnorm_ref."""
    return rmsnorm_ref(x, norm.scale, norm.eps, norm.residual)


def row_block(k: int) -> int:
    """The prologue's whole-row vector length (the standalone kernel's BLOCK)."""
    return triton.next_power_of_2(k)


@jit
def _norm_inv_rms(X, R, S, stride_x, stride_r, stride_s, M, K, eps, write_s,
                  M_P: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    """[M_P] fp32: each row's 1 / sqrt(mean(s²) + eps) for rows < M, 0 past them (their
    outputs are never stored). Where write_s (one program), s = round(x + r) is stored into S."""
    cols = tl.arange(0, BLOCK)
    cm = cols < K
    m = tl.arange(0, M_P)
    inv = tl.zeros([M_P], dtype=tl.float32)
    x_ptr, r_ptr, s_ptr = X + cols, R + cols, S + cols  # row i's, advanced by the row strides
    for i in range(0, M):
        x = tl.load(x_ptr, mask=cm, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr, mask=cm, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual's rounding
            tl.store(s_ptr, s, mask=cm & write_s)
        else:
            s = x
        sf = s.to(tl.float32)
        inv_i = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / K + eps)
        inv = tl.where(m == i, inv_i, inv)
        x_ptr += stride_x
        r_ptr += stride_r
        s_ptr += stride_s
    return inv


@jit
def _norm_tile(x, r, sc, inv, HAS_RES: tl.constexpr):
    """round(round(x + r) · inv · sc) in x's dtype; inv and sc broadcast to x's shape (fp32)."""
    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype) if HAS_RES else x
    return (s.to(tl.float32) * inv * sc.to(tl.float32)).to(x.dtype)


@jit
def _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv, k0, k, K, EVEN_K: tl.constexpr,
                 HAS_RES: tl.constexpr):
    """A GEMV step's tiles along K (mask on the last axis): W[rows, k0 + k] as loaded and x
    normalized as loaded, round(round(x + r)·inv·scale) over [:, k0 + k]; zero past K."""
    if EVEN_K:
        w, x, sc = tl.load(w_ptr + k0), tl.load(x_ptr + k0), tl.load(sc_ptr + k0)
        r = x
        if HAS_RES:
            r = tl.load(r_ptr + k0)
    else:
        k_ok = (k0 + k < K)[None, :]
        w = tl.load(w_ptr + k0, mask=k_ok, other=0.0)
        x = tl.load(x_ptr + k0, mask=k_ok, other=0.0)
        sc = tl.load(sc_ptr + k0, mask=k_ok, other=0.0)
        r = x
        if HAS_RES:
            r = tl.load(r_ptr + k0, mask=k_ok, other=0.0)
    return w, _norm_tile(x, r, sc, inv, HAS_RES)


__all__ = ["NormPrologue", "exact_scale", "norm_prologue", "normed_ref", "overlap", "row_block"]
