"""The GEMV f16 step's PTX (kernels/moe_gemv_dequant._GROUP_F16_ASM) run by a small PTX
interpreter on the CPU.

The CPU tests of the layer run the step's Triton emulation; the GPU tests run the compiled PTX.
This checks the asm text itself without a GPU: every code 0…15 in every one of a group's 32
nibble positions must meet its own x (the pre-split order: 16 even k, then 16 odd k) and come out
as fp4(c)·2^(s − 127)·x; random groups must match an fp64 dot product to fp16 accumulation.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from kernels.moe_gemv_dequant import _GROUP_F16_ASM
from runtime.mxfp4 import FP4_VALUES

M32, M16 = 0xFFFFFFFF, 0xFFFF


def f16_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float16).view(np.uint16))


def f16(bits: int) -> float:
    return float(np.array(bits & M16, dtype=np.uint16).view(np.float16))


def e4m3(byte: int) -> float:
    """OCP e4m3 (no infinities; 0x7F/0xFF NaN, never built here)."""
    s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
    v = m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def f16x2(lo: float, hi: float) -> int:
    return f16_bits(lo) | f16_bits(hi) << 16


def halves(r: int) -> tuple[float, float]:
    return f16(r), f16(r >> 16)


def f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def run_asm(asm: str, ops: dict[str, object]) -> dict[str, object]:
    """Executes the straight-line PTX subset the asm uses; b32/b64 registers hold ints, f32
    registers Python floats (rounded to fp32 after every op)."""
    regs = dict(ops)

    def val(tok: str) -> object:
        tok = tok.strip()
        if tok.startswith("0x"):
            return int(tok, 16)
        return int(tok) if tok.isdigit() else regs[tok]

    body = asm.strip()[1:-1]  # { ... }
    for line in (s.strip() for s in body.split(";")):
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        m = re.match(r"\{(\w+),\s*(\w+)\},\s*(\$?\w+)", args)
        if op in ("mov.b32", "mov.b64") and m:  # unpack into halves, low first
            bits = 16 if op == "mov.b32" else 32
            src = val(m.group(3))
            regs[m.group(1)], regs[m.group(2)] = src & ((1 << bits) - 1), src >> bits
            continue
        dst, *srcs = [a.strip() for a in args.split(",")]
        a = [val(s) for s in srcs]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "or.b32":
            regs[dst] = a[0] | a[1]
        elif op == "shl.b32":
            regs[dst] = (a[0] << a[1]) & M32
        elif op == "shr.b32":
            regs[dst] = a[0] >> a[1]
        elif op == "cvt.rn.f16x2.e4m3x2":  # low byte → low half (exact: e4m3 ⊂ fp16)
            regs[dst] = f16x2(e4m3(a[0] & 0xFF), e4m3(a[0] >> 8))
        elif op == "fma.rn.f16x2":  # fused per half: one rounding
            (x0, x1), (y0, y1), (z0, z1) = halves(a[0]), halves(a[1]), halves(a[2])
            regs[dst] = f16x2(x0 * y0 + z0, x1 * y1 + z1)
        elif op == "add.rn.f16x2":
            (x0, x1), (y0, y1) = halves(a[0]), halves(a[1])
            regs[dst] = f16x2(x0 + y0, x1 + y1)
        elif op == "cvt.f32.f16":
            regs[dst] = f16(a[0])
        elif op == "add.f32":
            regs[dst] = f32(a[0] + a[1])
        elif op == "fma.rn.f32":
            regs[dst] = f32(a[0] * a[1] + a[2])
        else:
            raise AssertionError(f"unexpected PTX op {op!r}: extend the interpreter")
    return regs


def group_operands(codes: list[int], x: list[float], scale: float, acc: float) -> dict:
    """One (row, 32-group): codes[k] and x[k] for k = 0…31 → the asm's operands."""
    words = [sum(codes[8 * w + 2 * b] << (8 * b) | codes[8 * w + 2 * b + 1] << (8 * b + 4)
                 for b in range(4)) for w in range(4)]
    pre = [x[k] for k in range(0, 32, 2)] + [x[k] for k in range(1, 32, 2)]  # pre-split
    packs = [sum(f16_bits(pre[4 * i + j]) << (16 * j) for j in range(4)) for i in range(8)]
    ops: dict[str, object] = {f"${1 + w}": words[w] for w in range(4)}
    ops.update({f"${5 + i}": packs[i] for i in range(8)})  # $5…$8 even k, $9…$12 odd k
    ops.update({"$13": scale, "$14": acc})
    return ops


def asm_text() -> str:
    return str(getattr(_GROUP_F16_ASM, "value", _GROUP_F16_ASM))


@pytest.mark.parametrize("k", range(32))
def test_every_code_in_every_nibble_position_meets_its_own_x(k: int) -> None:
    x = [float(i + 1) for i in range(32)]  # distinct: a wrong pairing shows
    for c in range(16):
        codes = [0] * 32
        codes[k] = c
        out = run_asm(asm_text(), group_operands(codes, x, 2.0**-3, 0.5))["$0"]
        assert out == 0.5 + FP4_VALUES[c] * 2.0**-6 * x[k] * 2.0**-3, (k, c)


def test_random_groups_match_the_dot_product_to_fp16_accumulation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        codes = [int(c) for c in rng.integers(0, 16, 32)]
        x = [float(np.float16(v)) for v in rng.standard_normal(32)]
        scale = 2.0 ** int(rng.integers(-20, 20))
        out = run_asm(asm_text(), group_operands(codes, x, scale, 0.0))["$0"]
        want = sum(FP4_VALUES[c] * 2.0**-6 * v for c, v in zip(codes, x, strict=True)) * scale
        bound = sum(abs(FP4_VALUES[c] * 2.0**-6 * v) for c, v in zip(codes, x, strict=True))
        assert abs(out - want) <= 16 * 2.0**-11 * bound * scale + 1e-30
