"""Triton helpers for finding a threshold in a long row without sorting it (used by sampling).

Floats map to uint32 keys in the same order (`order_key`: flip all bits of negatives, set the sign
bit of the rest; −0 is first folded into +0 so equal values share a key). A threshold is then found
digit by digit from the most significant end, as in radix select: each pass builds a histogram of
the next digit over the elements whose higher digits equal the prefix found so far, weighted by 1
(counts: the k-th largest) or by a mass (top-p), and `select_bin` picks the digit:

    bin b = the largest digit with  above + Σ_{d ≥ b} hist[d] ≥ target
    prefix |= b << shift;  above += Σ_{d > b} hist[d]

After all passes the prefix is the largest key v whose weight at or above v reaches the target
(exact for counts; for masses up to fp32 summation order). If no digit reaches the target (only
possible through rounding, e.g. a target equal to the whole mass), the lowest non-empty digit is
taken, so the threshold ends at the group's smallest key: everything is kept.

These functions are registered into a kernel file's KernelSet (see kernels/jit.py).
"""

from __future__ import annotations

import triton.language as tl


def order_key(z):
    """fp32 → uint32 with the same order (−0 folded into +0)."""
    bits = (z + 0.0).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def select_bin(h, above, target, NB: tl.constexpr):
    """One digit: h [NB] histogram (weights of the elements under the current prefix)."""
    bins = tl.arange(0, NB)
    ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # Σ_{d ≥ b} h[d]
    ok = (above + ge) >= target
    b = tl.max(tl.where(ok, bins, -1), axis=0)
    lowest = tl.min(tl.where(h > 0, bins, NB - 1), axis=0)
    b = tl.where(b >= 0, b, lowest)
    gt = tl.sum(tl.where(bins > b, h, 0), axis=0)
    return b, above + gt


def digit(key, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit digit of each key starting at bit SHIFT."""
    return ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)


def under_prefix(key, prefix, HI: tl.constexpr):
    """Whether each key's bits from HI up equal the prefix's (HI = 32: every key)."""
    if HI >= 32:  # noqa: SIM108 - a constexpr branch (no shift by 32)
        match = key == key
    else:
        match = (key >> HI) == (prefix >> HI)
    return match


HELPERS = (order_key, select_bin, digit, under_prefix)
