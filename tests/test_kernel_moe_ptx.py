"""The fast path's PTX (kernels/moe_dequant._E2M1_X4_ASM) run by a tiny PTX interpreter on the CPU.

The GPU tests check the compiled kernels; this one checks the asm text itself, for every byte
value, without a GPU: the bit tricks must turn each nibble into e4m3 bits worth fp4 · 2⁻⁶
(decoded here by torch's float8_e4m3fn), and cvt.rn.f16x2.e4m3x2 must see them in the order the
outputs promise (low byte → low half).
"""

from __future__ import annotations

import re

import torch

from kernels.moe_dequant import _E2M1_X4_ASM
from runtime.mxfp4 import FP4_VALUES

MASK32 = 0xFFFFFFFF


def e4m3_to_f16_bits(byte: int) -> int:
    value = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16)
    return int(value.view(torch.int16).item()) & 0xFFFF


def run_asm(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Executes the straight-line subset of PTX the asm uses; registers hold ints."""
    regs = dict(operands)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    body = asm.split("{", 1)[1].rsplit("}", 1)[0]
    for line in (s.strip() for s in body.split(";")):
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32":  # {lo16, hi16}, src: unpack halves
            m = re.match(r"\{(\w+),\s*(\w+)\},\s*(\$?\w+)", args)
            src = val(m.group(3))
            regs[m.group(1)], regs[m.group(2)] = src & 0xFFFF, src >> 16
            continue
        dst, *srcs = [a.strip() for a in args.split(",")]
        if op == "cvt.rn.f16x2.e4m3x2":  # b16 of two e4m3 → f16x2, low byte → low half
            b = val(srcs[0])
            regs[dst] = e4m3_to_f16_bits(b & 0xFF) | (e4m3_to_f16_bits(b >> 8) << 16)
        elif op == "and.b32":
            regs[dst] = val(srcs[0]) & val(srcs[1])
        elif op == "or.b32":
            regs[dst] = val(srcs[0]) | val(srcs[1])
        elif op == "shl.b32":
            regs[dst] = (val(srcs[0]) << val(srcs[1])) & MASK32
        elif op == "shr.b32":
            regs[dst] = val(srcs[0]) >> val(srcs[1])
        else:
            raise AssertionError(f"unexpected PTX op {op!r}: extend the interpreter")
    return regs


def f16(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.float16))


def test_asm_turns_every_nibble_into_its_fp4_value_times_2_to_the_minus_6() -> None:
    asm = str(_E2M1_X4_ASM.value if hasattr(_E2M1_X4_ASM, "value") else _E2M1_X4_ASM)
    for first in range(0, 256, 4):
        packed = [first, first + 1, first + 2, first + 3]  # four code bytes, byte 0 lowest
        word = packed[0] | packed[1] << 8 | packed[2] << 16 | packed[3] << 24
        regs = run_asm(asm, {"$4": word})
        lo = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        hi = [regs["$2"] & 0xFFFF, regs["$2"] >> 16, regs["$3"] & 0xFFFF, regs["$3"] >> 16]
        for i, byte in enumerate(packed):
            assert f16(lo[i]) == FP4_VALUES[byte & 15] / 64, (byte, "low nibble")
            assert f16(hi[i]) == FP4_VALUES[byte >> 4] / 64, (byte, "high nibble")
