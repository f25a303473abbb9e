"""bench/access_pattern.py streams exactly the GEMV 1 bytes it claims, in both layouts: the XOR of
what each program reads equals the XOR of its rows' bytes (interpreted, small shapes)."""

from __future__ import annotations

import functools

import pytest
import torch
import triton

from bench.access_pattern import jit


def xor_all(t: torch.Tensor) -> int:
    return functools.reduce(lambda a, b: a ^ b, t.flatten().tolist(), 0)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize(("bn", "cw"), [(32, 32), (16, 128), (4, 512)])
def test_each_program_reads_its_rows_bytes_once(tiled: bool, bn: int, cw: int) -> None:
    rows, row_w = 64, 360  # 1440-byte rows, as GEMV 1's
    steps = triton.cdiv(row_w, cw)
    w = torch.randint(-2**31, 2**31 - 1, (rows * steps * cw,), dtype=torch.int32)
    out = torch.zeros(rows // bn, dtype=torch.int32)
    jit["_stream_kernel"][(rows // bn,)](w, out, ROW_W=row_w, BLOCK_N=bn, CHUNK_W=cw,
                                         STEPS=steps, TILED=tiled)
    if tiled:  # [program, step, row, word], a row's last step padded
        t = w.view(rows // bn, steps, bn, cw)
        keep = (torch.arange(steps)[:, None] * cw + torch.arange(cw)[None, :]) < row_w
        want = [xor_all(t[p][keep[:, None, :].expand(steps, bn, cw)]) for p in range(rows // bn)]
    else:  # row-major
        t = w[: rows * row_w].view(rows // bn, bn * row_w)
        want = [xor_all(t[p]) for p in range(rows // bn)]
    assert out.tolist() == want
