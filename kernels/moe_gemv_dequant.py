"""The GEMV path's fast main step (kernels/moe_gemv.py): whole-word MXFP4 dequantization, packed math.

The exact step (moe_gemv._gemv_step) extracts every nibble on its own and splits x even/odd through
shared memory: ~17.6 SASS instructions per weight byte, about twice what an H100 SM can issue
while streaming weights at full bandwidth (128 thread-instructions per clock for ≈ 13 bytes).
Here each 32-bit word of codes (8 nibbles) becomes four f16x2 registers in 11 instructions
(kernels/moe_dequant._E2M1_X4_ASM: masks/shifts build e4m3 bytes worth fp4(c)·2⁻⁶, exactly, then
the hardware's cvt.rn.f16x2.e4m3x2); its outputs pair byte i's and byte i+1's low nibbles (k = 2i,
2i + 2) and their high nibbles (2i + 1, 2i + 3). x is read pre-split per 32-group (evens, then
odds: `presplit`), so its contiguous, vectorized loads hold the same pairs: no shuffles, no shared
memory. The group's scale 2^(s − 127)·2⁶ = 2^(s − 121) (fp32 bits (s + 6) << 23, exact for every
scale byte ≤ 248) multiplies the group's partial sum.

Two ways to multiply, by DEQ:
  F32 (= 1): the f16 weights widened to fp32, FFMA chains in fp32. Products are exact for fp16/bf16
     x (2 significant bits × ≤ 11), so results differ from the exact step by summation order only.
  F16 (= 2): HFMA2 in fp16 (x converted to fp16): per row and 32-group two interleaved chains of 8
     f16x2 products (lo: k ≡ 0 mod 2, hi: k ≡ 1), added in f16 and widened to fp32 once. A product
     w·x is exact when x is a bf16 or fp16 value with 2⁻¹⁷ ≤ |x| ≤ 65504 (10–13 significant bits ≤
     11 + subnormal margin); each f16 partial is a sum of 16 products, so its rounding error is
     ≤ 15·2⁻¹¹·Σ|w·x| over those 16 (≈ 0.7 % of the absolute sum, worst case; ~2⁻⁹ typical).
     |w| ≤ 6·2⁻⁶, so |partial| ≤ 1.5·max|x|: x must stay below ~43000 (gpt-oss GEMM 1 inputs are
     RMS-normalized; GEMM 2's act is ≤ L·(L + 1) = 56 by swiglu's clamp). Meant for bf16/fp16 x.
"""

from __future__ import annotations

import triton.language as tl

from kernels.moe_dequant import _E2M1_X4_ASM, _e2m1_x4, _e2m1_x4_emulated, _fp4_f32  # noqa: F401

F32: tl.constexpr = tl.constexpr(1)
F16: tl.constexpr = tl.constexpr(2)


def _load_scales(S, s_rows, stride_sg, g, k_bound, MASK: tl.constexpr):
    """The step's exponents [BN, NG] for the groups g of rows s_rows (S + s_rows: the rows'
    first exponent; stride_sg: per group, or per word). S of uint8: one byte per (row, group),
    returned as u8. S of int32 (kernels/moe_gemv_scales.py): words of 4 groups' bytes, the
    group's byte extracted → int32 0…255. MASK: groups at or past k_bound / 32 read as 0."""
    mask = (g < k_bound // 32)[None, :] if MASK else None
    other = 0 if MASK else None
    if S.dtype.element_ty == tl.int32:
        ptr = S + s_rows[:, None] + (g // 4)[None, :] * stride_sg  # [BN, NG] (4 groups share)
        sc = (tl.load(ptr, mask=mask, other=other) >> ((g % 4) * 8)[None, :]) & 0xFF
    else:
        sc = tl.load(S + s_rows[:, None] + g[None, :] * stride_sg, mask=mask, other=other)  # u8
    return sc


def _load_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_bound,
              BLOCK_K: tl.constexpr, MASK: tl.constexpr):
    """One step's raw operands for _math_f32: codes [BN, NG, 16] u8, scale bytes [BN, NG], x's
    even and odd k [NG, 16] (pre-split fp32). MASK: groups at or past k_bound / 32 read as 0."""
    NG: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, NG)  # [NG] group index
    i = tl.arange(0, 16)
    byte = g[None, :, None] * 16 + i[None, None, :]  # [1, NG, 16]
    xoff = x_row + g[:, None] * 32 + i[None, :]  # [NG, 16]: byte i's low nibble (k = 2i)
    WORDS: tl.constexpr = S.dtype.element_ty == tl.int32  # scale words: issued first
    if WORDS:
        sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)  # [BN, NG]
    if MASK:
        gm = g < k_bound // 32
        codes = tl.load(W + w_rows[:, None, None] + byte, mask=gm[None, :, None], other=0)
        if not WORDS:
            sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)
        xe = tl.load(XS + xoff, mask=gm[:, None], other=0.0)
        xo = tl.load(XS + xoff + 16, mask=gm[:, None], other=0.0)
    else:
        codes = tl.load(W + w_rows[:, None, None] + byte)  # [BN, NG, 16] u8
        if not WORDS:
            sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)
        xe = tl.load(XS + xoff)  # [NG, 16]: x[32g + 2i]
        xo = tl.load(XS + xoff + 16)  # x[32g + 2i + 1]
    return codes, sc, xe, xo


def _math_f32(codes, sc, xe, xo, acc, EMULATE: tl.constexpr):
    """acc[BN, NG] += the groups' scaled sums Σ w·x (operands from _load_f32)."""
    BN: tl.constexpr = codes.shape[0]
    NG: tl.constexpr = codes.shape[1]
    lo, hi = _e2m1_x4(codes, EMULATE)
    pe = tl.sum(tl.reshape(lo.to(tl.float32) * xe[None, :, :], (BN, NG, 8, 2)), axis=2)
    po = tl.sum(tl.reshape(hi.to(tl.float32) * xo[None, :, :], (BN, NG, 8, 2)), axis=2)
    part = tl.sum(pe + po, axis=2)  # [BN, NG]
    scale = ((sc.to(tl.int32) + 6) << 23).to(tl.float32, bitcast=True)  # 2^(s − 121)
    return acc + part * scale


def _gemv_step_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc,
                   BLOCK_K: tl.constexpr, MASK: tl.constexpr, EMULATE: tl.constexpr):
    """acc[BN, NG] += per-group sums of W[rows, k0:k0+BLOCK_K]·x[k0:k0+BLOCK_K], scaled. W: code
    bytes (rows at w_rows), XS: x pre-split, fp32."""
    codes, sc, xe, xo = _load_f32(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim,
                                  BLOCK_K, MASK)
    return _math_f32(codes, sc, xe, xo, acc, EMULATE)


def _word_ptx(w: int, xe: int, xo: int) -> str:
    """One code word ($w): e4m3 bytes of its 4 low nibbles (l) and 4 high nibbles (h), each
    fp4(c)·2⁻⁶ exactly, 4 cvt to f16x2 (a0 = k 0, 2; a1 = k 4, 6; b0 = k 1, 3; b1 = k 5, 7 of
    the word's 8), times x's pairs in the same order ($xe: its 4 even k, $xo: its 4 odd k)."""
    return (
        f"and.b32 t, ${w}, 0x07070707; shl.b32 t, t, 2; and.b32 l, ${w}, 0x08080808; "
        f"shl.b32 l, l, 4; or.b32 l, l, t; shr.b32 t, ${w}, 2; and.b32 t, t, 0x1C1C1C1C; "
        f"and.b32 h, ${w}, 0x80808080; or.b32 h, h, t; "
        "mov.b32 {s0, s1}, l; cvt.rn.f16x2.e4m3x2 a0, s0; cvt.rn.f16x2.e4m3x2 a1, s1; "
        "mov.b32 {s0, s1}, h; cvt.rn.f16x2.e4m3x2 b0, s0; cvt.rn.f16x2.e4m3x2 b1, s1; "
        f"mov.b64 {{e0, e1}}, ${xe}; mov.b64 {{o0, o1}}, ${xo}; "
        "fma.rn.f16x2 p, a0, e0, p; fma.rn.f16x2 p, a1, e1, p; "
        "fma.rn.f16x2 q, b0, o0, q; fma.rn.f16x2 q, b1, o1, q; "
    )


# One (row, 32-group): $0 = $14 + $13·Σ_k w_k·x_k, from the group's 4 code words ($1…$4), x's
# even k ($5…$8) and odd k ($9…$12) as 4 f16 each (b64), the scale 2^(s − 121) ($13, fp32).
# Two f16x2 chains (lo, hi nibbles), added in f16, widened to fp32 once.
_GROUP_F16_ASM = tl.constexpr(
    "{ .reg .b32 t, l, h, a0, a1, b0, b1, e0, e1, o0, o1, p, q; .reg .b16 s0, s1; "
    ".reg .f32 f0, f1; mov.b32 p, 0; mov.b32 q, 0; "
    + "".join(_word_ptx(1 + i, 5 + i, 9 + i) for i in range(4))
    + "add.rn.f16x2 p, p, q; mov.b32 {s0, s1}, p; cvt.f32.f16 f0, s0; cvt.f32.f16 f1, s1; "
    "add.f32 f0, f0, f1; fma.rn.f32 $0, f0, $13, $14; }"
)


def _nib_f16(w, shift: tl.constexpr):
    """The nibble of int32 words at bit `shift` → fp16 fp4(c)·2⁻⁶ (fp16 bits ((c & 8) << 12) |
    ((c & 7) << 9) are fp4(c)·2⁻¹⁴: fp16's subnormals line up with e2m1's)."""
    c = (w >> shift) & 15
    v = (((c & 8) << 12) | ((c & 7) << 9)).to(tl.int16).to(tl.float16, bitcast=True)
    return v * 256.0


def _half_f16(x, j: tl.constexpr):
    """fp16 number j (0…3, lowest first) of int64 words."""
    return ((x >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


def _word_f16_emulated(w, xe, xo, p0, p1, q0, q1):
    """_word_ptx in plain Triton: the same products into the same f16 halves, in the same order
    (p0/p1: the low/high halves of chain p; q0/q1 of chain q)."""
    p0 = p0 + _nib_f16(w, 0) * _half_f16(xe, 0)
    p1 = p1 + _nib_f16(w, 8) * _half_f16(xe, 1)
    p0 = p0 + _nib_f16(w, 16) * _half_f16(xe, 2)
    p1 = p1 + _nib_f16(w, 24) * _half_f16(xe, 3)
    q0 = q0 + _nib_f16(w, 4) * _half_f16(xo, 0)
    q1 = q1 + _nib_f16(w, 12) * _half_f16(xo, 1)
    q0 = q0 + _nib_f16(w, 20) * _half_f16(xo, 2)
    q1 = q1 + _nib_f16(w, 28) * _half_f16(xo, 3)
    return p0, p1, q0, q1


def _split4(v):
    """[..., 4] → its 4 slices along the last axis (in registers: the 4 are one thread's)."""
    ev, od = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
    v0, v2 = tl.split(ev)
    v1, v3 = tl.split(od)
    return v0, v1, v2, v3


def _load_f16(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_bound,
              BLOCK_K: tl.constexpr, MASK: tl.constexpr):
    """One step's raw operands for _math_f16: code words [BN, NG, 4] int32, scale bytes [BN, NG],
    x's even and odd k [NG, 4] (int64, 4 fp16 each). MASK: groups at or past k_bound / 32 read
    as 0."""
    NG: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, NG)  # [NG] group index
    q = tl.arange(0, 4)
    wp = W + w_rows[:, None, None] + g[None, :, None] * 4 + q[None, None, :]  # [BN, NG, 4]
    xp = XS + x_row + g[:, None] * 8 + q[None, :]  # [NG, 4]: 16 even k, then 16 odd k at + 4
    WORDS: tl.constexpr = S.dtype.element_ty == tl.int32  # scale words: issued first
    if WORDS:
        sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)  # [BN, NG]
    if MASK:
        gm = g < k_bound // 32
        words = tl.load(wp, mask=gm[None, :, None], other=0)
        if not WORDS:
            sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)
        xe = tl.load(xp, mask=gm[:, None], other=0)
        xo = tl.load(xp + 4, mask=gm[:, None], other=0)
    else:
        words = tl.load(wp)
        if not WORDS:
            sc = _load_scales(S, s_rows, stride_sg, g, k_bound, MASK)
        xe = tl.load(xp)
        xo = tl.load(xp + 4)
    return words, sc, xe, xo


def _math_f16(words, sc, xe, xo, acc, EMULATE: tl.constexpr):
    """acc[BN, NG] += the groups' scaled sums Σ w·x (operands from _load_f16)."""
    scale = ((sc.to(tl.int32) + 6) << 23).to(tl.float32, bitcast=True)  # 2^(s − 121)
    w0, w1, w2, w3 = _split4(words)  # [BN, NG] each
    e0, e1, e2, e3 = _split4(xe)  # [NG] each
    o0, o1, o2, o3 = _split4(xo)
    if EMULATE:
        z = tl.zeros(w0.shape, dtype=tl.float16)
        p0, p1, q0, q1 = _word_f16_emulated(w0, e0[None, :], o0[None, :], z, z, z, z)
        p0, p1, q0, q1 = _word_f16_emulated(w1, e1[None, :], o1[None, :], p0, p1, q0, q1)
        p0, p1, q0, q1 = _word_f16_emulated(w2, e2[None, :], o2[None, :], p0, p1, q0, q1)
        p0, p1, q0, q1 = _word_f16_emulated(w3, e3[None, :], o3[None, :], p0, p1, q0, q1)
        part = (p0 + q0).to(tl.float32) + (p1 + q1).to(tl.float32)
        acc = acc + part * scale
    else:
        acc = tl.inline_asm_elementwise(
            _GROUP_F16_ASM, "=f,r,r,r,r,l,l,l,l,l,l,l,l,f,f",
            [w0, w1, w2, w3, e0[None, :], e1[None, :], e2[None, :], e3[None, :],
             o0[None, :], o1[None, :], o2[None, :], o3[None, :], scale, acc],
            dtype=tl.float32, is_pure=True, pack=1,
        )
    return acc


def _gemv_step_f16(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim, acc,
                   BLOCK_K: tl.constexpr, MASK: tl.constexpr, EMULATE: tl.constexpr):
    """acc[BN, NG] += per-group sums of W[rows, k0:k0+BLOCK_K]·x[k0:k0+BLOCK_K], scaled. W: code
    words (int32; rows at w_rows words, 16-byte aligned: the launcher checks), XS: x pre-split
    in fp16, as int64 (4 values each)."""
    words, sc, xe, xo = _load_f16(XS, x_row, W, w_rows, S, s_rows, stride_sg, k0, k_dim,
                                  BLOCK_K, MASK)
    return _math_f16(words, sc, xe, xo, acc, EMULATE)


HELPERS = (_e2m1_x4_emulated, _fp4_f32, _e2m1_x4, _load_f32, _math_f32, _gemv_step_f32, _nib_f16,
           _load_scales, _half_f16, _word_f16_emulated, _split4, _load_f16, _math_f16, _gemv_step_f16)
