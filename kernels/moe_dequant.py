"""MXFP4 weight tiles dequantized inside the MoE GEMMs (Triton helpers, used by kernels/moe_gemm.py).

value = fp4(code) · 2^(scale − 127) (runtime/mxfp4.py); the byte at K offset p holds k = 2p (low
nibble) and k = 2p + 1 (high nibble). Two ways to the MMA's operands:

exact (any dtype, the interpreter's path): code → fp16 bits (sign c₃ at bit 15, c₀…c₂ at bits 9…11)
    is exactly fp4(c)·2⁻¹⁴ (fp16's subnormals line up with e2m1's); one fp32 multiply by the
    group's 2^(s − 113), built from its exponent bits (scale bytes ≤ 240), then the activation
    dtype. Even and odd k come out as two tiles, multiplied with the even and odd activations.

fast (CUDA, fp16 MMA): four code bytes at once, in PTX: each nibble → e4m3 bits (c₀…c₂ at bits
    2…4, sign at 7: exactly fp4(c)·2⁻⁶, subnormals line up again), then the hardware's
    cvt.rn.f16x2.e4m3x2 (two values per instruction) and one packed fp16 multiply by the group's
    2^(s − 121) (exact for scale bytes 107…136, i.e. |w| from 2⁻²¹ to 6·2⁹; below, weights under
    6·2⁻²¹ flush to 0; prepare_moe checks the upper bound once at load). About 4 instructions
    per weight byte instead of ~16. The activations are converted to fp16 (exact for bf16 values
    of magnitude 2⁻¹⁴…65504).
    Register order: the tile is loaded as [BN, G, 4 t, 4 a] (byte 4t + a of each 16-byte group,
    contiguous 4-byte loads) and its columns are ordered c = 16h + 8a₁ + 2t + a₀ (a = 2a₁ + a₀,
    h the nibble) for k = 8t + 2a + h: the asm's f16x2 outputs (low nibbles of bytes a₀ = 0, 1)
    are then exactly registers of thread t's MMA fragment (columns 2t, 2t + 1 of each 8). The asm
    is elementwise (output i depends on byte i alone), so this is about speed, never results.
    The activation tile gets the same column permutation: the dot product is unchanged.
OCP Microscaling Formats (MX) v1.0: https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf
"""

from __future__ import annotations

import triton.language as tl

# Elementwise over 4 code bytes (one b32): lo[i], hi[i] = byte i's low / high nibble as fp16 · 2⁻⁶.
_E2M1_X4_ASM = tl.constexpr("""
{
.reg .b32 a, b, lo, hi;
.reg .b16 l0, l1, h0, h1;
and.b32 a, $4, 0x07070707;
shl.b32 a, a, 2;
and.b32 b, $4, 0x08080808;
shl.b32 b, b, 4;
or.b32 lo, a, b;
shr.b32 a, $4, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $4, 0x80808080;
or.b32 hi, a, b;
mov.b32 {l0, l1}, lo;
mov.b32 {h0, h1}, hi;
cvt.rn.f16x2.e4m3x2 $0, l0;
cvt.rn.f16x2.e4m3x2 $1, l1;
cvt.rn.f16x2.e4m3x2 $2, h0;
cvt.rn.f16x2.e4m3x2 $3, h1;
}
""")


# L2 prefetches: fire-and-forget (no register or shared-memory cost), so a k-loop can keep a few
# k-steps of weight bytes in flight from DRAM while it dequantizes and multiplies: the step's own
# loads then wait an L2 round trip instead of a DRAM one. Per-thread addresses (CCTL.E.PF2);
# cp.async.bulk.prefetch takes uniform operands only, i.e. a 32-pass loop over the lanes' rows.
_L2_ASM = tl.constexpr("""
prefetch.global.L2 [$1];
mov.b32 $0, 0;
""")
# One cache line per call where the address starts a 32-byte sector or $2 ≠ 0 (a run's first
# byte): the exponent bytes of a k-step, which have no alignment to rely on.
_L2_LINE_ASM = tl.constexpr("""
{
.reg .pred p;
.reg .b64 t;
and.b64 t, $1, 31;
setp.eq.b64 p, t, 0;
setp.ne.or.b32 p, $2, 0, p;
@p prefetch.global.L2 [$1];
mov.b32 $0, 0;
}
""")


def _fp4_f32(c):
    """e2m1 codes (int32, 0…15) → fp32 values · 2⁻¹⁴."""
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _w_tile(W, S, w_row, s_row, smask, stride_sg, k0, K, DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
            MASK_K: tl.constexpr):
    """exact: rows at byte offsets w_row/s_row [BN] (all valid), k0 … k0+BLOCK_K (masked at K
    only with MASK_K) → (even k, odd k) values, each [BN, BLOCK_K/2] in DTYPE."""
    G: tl.constexpr = BLOCK_K // 32
    g = tl.arange(0, G)
    b = tl.arange(0, 16)
    cptr = W + w_row[:, None, None] + (k0 // 2 + g * 16)[None, :, None] + b[None, None, :]
    sptr = S + s_row[:, None] + ((k0 // 32 + g) * stride_sg)[None, :]  # stride_sg: 1 or N
    if MASK_K:
        kmask = (k0 + g * 32) < K  # [G]
        codes = tl.load(cptr, mask=kmask[None, :, None], other=0).to(tl.int32)  # [BN, G, 16]
        sc = tl.load(sptr, mask=smask[:, None] & kmask[None, :], other=0).to(tl.int32)  # [BN, G]
    else:
        codes = tl.load(cptr).to(tl.int32)
        sc = tl.load(sptr, mask=smask[:, None], other=0).to(tl.int32)
    scale = ((tl.minimum(sc, 240) + 14) << 23).to(tl.float32, bitcast=True)[:, :, None]
    lo = (_fp4_f32(codes & 15) * scale).to(DTYPE)
    hi = (_fp4_f32(codes >> 4) * scale).to(DTYPE)
    bn: tl.constexpr = codes.shape[0]
    return tl.reshape(lo, (bn, BLOCK_K // 2)), tl.reshape(hi, (bn, BLOCK_K // 2))


def _a_tile(A, a_row, k0, K, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """exact: activation rows at element offsets a_row [BM] (all valid) → (even k, odd k)
    [BM, BLOCK_K/2]."""
    k = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    ptr = A + a_row[:, None] + k[None, :]
    if MASK_K:
        m = (k < K)[None, :]
        return tl.load(ptr, mask=m, other=0.0), tl.load(ptr + 1, mask=m, other=0.0)
    return tl.load(ptr), tl.load(ptr + 1)


def _e2m1_x4_emulated(codes):
    """_E2M1_X4_ASM in plain Triton (the interpreter cannot run PTX): codes u8 → (lo, hi) fp16."""
    c = codes.to(tl.int32)
    return (_fp4_f32(c & 15) * 256.0).to(tl.float16), (_fp4_f32(c >> 4) * 256.0).to(tl.float16)


def _e2m1_x4(codes, EMULATE: tl.constexpr):
    """u8 codes → (low, high nibble) as fp16 fp4(c)·2⁻⁶: _E2M1_X4_ASM compiled, its plain-Triton
    emulation where the interpreter runs."""
    if EMULATE:
        lo, hi = _e2m1_x4_emulated(codes)
    else:
        lo, hi = tl.inline_asm_elementwise(
            _E2M1_X4_ASM, "=r,=r,=r,=r,r", [codes], dtype=(tl.float16, tl.float16),
            is_pure=True, pack=4,
        )
    return lo, hi


def _w_tile_fast(W, S, w_row, s_row, smask, stride_sg, k0, K, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
                 MASK_K: tl.constexpr, WIDE: tl.constexpr = False):
    """fast: rows at byte offsets w_row/s_row [BN] → [BN, BLOCK_K] fp16 weights; in each
    32-group column c = 16h + 8a₁ + 2t + a₀ holds k = 8t + 2a + h (byte 4t + a, a = 2a₁ + a₀).
    WIDE: whole K blocks load each row's BLOCK_K/2 bytes as one run (16-byte loads or cp.async,
    the [BN, G, 4, 4] split after the load) instead of 4-byte pieces."""
    G: tl.constexpr = BLOCK_K // 32
    BN: tl.constexpr = w_row.shape[0]
    g = tl.arange(0, G)
    q = tl.arange(0, 4)
    off = (k0 // 2 + g * 16)[None, :, None, None] + (4 * q)[None, None, :, None] \
        + q[None, None, None, :]
    cptr = W + w_row[:, None, None, None] + off
    sptr = S + s_row[:, None] + ((k0 // 32 + g) * stride_sg)[None, :]  # stride_sg: 1 or N
    if MASK_K:
        kmask = (k0 + g * 32) < K  # [G]
        codes = tl.load(cptr, mask=kmask[None, :, None, None], other=0)  # [BN, G, 4t, 4a]
        sc = tl.load(sptr, mask=smask[:, None] & kmask[None, :], other=0).to(tl.int32)  # [BN, G]
    elif WIDE:
        b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        codes = tl.reshape(tl.load(W + w_row[:, None] + b[None, :]), (BN, G, 4, 4))
        sc = tl.load(sptr, mask=smask[:, None], other=0).to(tl.int32)
    else:
        codes = tl.load(cptr)
        sc = tl.load(sptr, mask=smask[:, None], other=0).to(tl.int32)
    return _scaled_fast(codes, sc, BLOCK_K, EMULATE)


def _scaled_fast(codes, sc, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """A k-step's codes [BN, G, 4t, 4a] u8 and exponents [BN, G] int32 → [BN, BLOCK_K] fp16
    weights in _w_tile_fast's column order."""
    G: tl.constexpr = BLOCK_K // 32
    BN: tl.constexpr = codes.shape[0]
    lo, hi = _e2m1_x4(codes, EMULATE)
    v = tl.reshape(tl.join(lo, hi), (BN, G, 4, 2, 2, 2))  # [BN, G, t, a₁, a₀, h]
    v = tl.reshape(tl.permute(v, (0, 1, 5, 3, 2, 4)), (BN, G, 32))  # [BN, G, h, a₁, t, a₀]
    sc = ((tl.maximum(sc, 106) - 106) << 10).to(tl.int16).to(tl.float16, bitcast=True)  # 2^(s−121)
    return tl.reshape(v * sc[:, :, None], (BN, BLOCK_K))


def _a_tile_fast(A, a_row, k0, K, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """fast: activation rows [BM] (all valid) → [BM, BLOCK_K] fp16, columns permuted as
    _w_tile_fast's."""
    G: tl.constexpr = BLOCK_K // 32
    BM: tl.constexpr = a_row.shape[0]
    k = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:
        x = tl.load(A + a_row[:, None] + k[None, :], mask=(k < K)[None, :], other=0.0)
    else:
        x = tl.load(A + a_row[:, None] + k[None, :])
    x = x.to(tl.float16)
    x = tl.reshape(x, (BM, G, 4, 2, 2, 2))  # k = 8t + 4a₁ + 2a₀ + h: [BM, G, t, a₁, a₀, h]
    return tl.reshape(tl.permute(x, (0, 1, 5, 3, 2, 4)), (BM, BLOCK_K))


def _l2_prefetch(W, S, w_row, s_row, stride_sg, k0, BLOCK_K: tl.constexpr,
                 EMULATE: tl.constexpr):
    """Ask L2 for the codes and exponents of the k-step at k0 of rows w_row/s_row [BN] (all in
    bounds: callers pass a whole step inside K): one prefetch per 32-byte sector of codes (rows
    start 32-byte aligned when K/2 is a multiple of 32, as at gpt-oss's 2880), and per sector or
    run of exponent bytes. A hint: no effect on results; nothing to do in the interpreter."""
    if not EMULATE:
        G: tl.constexpr = BLOCK_K // 32
        NS: tl.constexpr = max(1, BLOCK_K // 64)  # 32-byte sectors of a row's BLOCK_K/2 bytes
        cptr = W + w_row[:, None] + (k0 // 2 + 32 * tl.arange(0, NS))[None, :]  # [BN, NS]
        tl.inline_asm_elementwise(_L2_ASM, "=r,l", [cptr], dtype=tl.int32, is_pure=False,
                                  pack=1)
        g = tl.arange(0, G)
        sptr = S + s_row[:, None] + ((k0 // 32 + g) * stride_sg)[None, :]  # [BN, G]
        rows = tl.arange(0, w_row.shape[0])[:, None]
        first = ((rows == 0) | (g[None, :] == 0)).to(tl.int32)  # each run's first byte
        tl.inline_asm_elementwise(_L2_LINE_ASM, "=r,l,r", [sptr, first], dtype=tl.int32,
                                  is_pure=False, pack=1)


HELPERS = (_l2_prefetch, _fp4_f32, _w_tile, _a_tile, _e2m1_x4_emulated, _e2m1_x4, _scaled_fast,
           _w_tile_fast, _a_tile_fast)
