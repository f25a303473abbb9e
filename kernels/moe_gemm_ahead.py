"""Exponents one k-step ahead (GemmTiles.scale_ahead; notes/moe.md "Tiles at 64–512 tokens").

In the fast path's k-step (kernels/moe_dequant._w_tile_fast) the exponent bytes were loaded after
the codes; the compiled loop issued that load only after the codes' shuffle into the MMA layout
(shared memory, barriers), so every step waited two serialized memory round trips. Here the
exponents of step i + 1 are loaded at the top of step i, before its codes, and carried to the
next step in registers (4 bytes per thread for 128 rows × k128): the step's own wait is then the
codes' round trip alone. Values and order of operations are those of _w_tile_fast: same bits.
"""

from __future__ import annotations

import triton.language as tl

from kernels.moe_dequant import _scaled_fast


def _scales(S, s_row, smask, stride_sg, k0, ok, BLOCK_K: tl.constexpr):
    """Exponent bytes of the k-step at k0 for rows s_row [BN] (masked rows and `ok` false → 0):
    [BN, G] int32."""
    g = tl.arange(0, BLOCK_K // 32)
    sptr = S + s_row[:, None] + ((k0 // 32 + g) * stride_sg)[None, :]  # stride_sg: 1 or N
    return tl.load(sptr, mask=smask[:, None] & ok, other=0).to(tl.int32)


def _w_tile_fast_sc(W, w_row, sc, k0, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
                    WIDE: tl.constexpr):
    """_w_tile_fast of a whole k-step (no K mask) with its exponents sc [BN, G] given: [BN,
    BLOCK_K] fp16 in the same column order (c = 16h + 8a₁ + 2t + a₀ holds k = 8t + 2a + h)."""
    G: tl.constexpr = BLOCK_K // 32
    BN: tl.constexpr = w_row.shape[0]
    if WIDE:
        b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        codes = tl.reshape(tl.load(W + w_row[:, None] + b[None, :]), (BN, G, 4, 4))
    else:
        g = tl.arange(0, G)
        q = tl.arange(0, 4)
        off = (k0 // 2 + g * 16)[None, :, None, None] + (4 * q)[None, None, :, None] \
            + q[None, None, None, :]
        codes = tl.load(W + w_row[:, None, None, None] + off)  # [BN, G, 4t, 4a]
    return _scaled_fast(codes, sc, BLOCK_K, EMULATE)


HELPERS = (_scales, _w_tile_fast_sc)
