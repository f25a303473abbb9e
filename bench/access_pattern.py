"""How fast can the MoE GEMV 1's weight bytes stream, by access pattern alone (no dequantization)?

    python -m bench.access_pattern [--copies 4]

GEMV 1 of one 20b token reads 4 experts × 5760 rows × 1440 code bytes (33 MB) at ≈ 1.7 TB/s
(20.7 µs, run 46), while the bf16 dense GEMVs stream 24–30 MB at ≈ 2.4 TB/s. Its programs read
32 rows × 128 bytes per k-step: every 1440-byte row is visited in 11–12 pieces ≈ 1 µs apart. This
kernel only loads and XORs the bytes (16-byte vector loads, one sum per program), so the figures
isolate the pattern:
- `rows BN × C B`: the checkpoint layout, programs of BN rows reading C bytes of each per step
  (C = 128 is today's GEMV 1, 1440 a whole row at once);
- `tiled BN × C B`: the same steps with each step's BN × C bytes contiguous (a repack at load).
If the tiled or long-chunk patterns run well above 1.7 TB/s and the 128-byte row pattern does
not, GEMV 1 is held back by its access pattern (DRAM locality), not by its math.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.common import graph_call_us, measure_peaks, record, require_cuda
from kernels.jit import KernelSet

jit = KernelSet(globals())  # compiled on CUDA tensors, interpreted on CPU ones (the test)

ROWS, ROW_BYTES = 4 * 5760, 1440  # GEMV 1 of one 20b token: 4 experts' gate/linear rows


@jit
def _stream_kernel(W, OUT, ROW_W: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_W: tl.constexpr,
                   STEPS: tl.constexpr, TILED: tl.constexpr):
    """W: int32 words; rows of ROW_W words; CHUNK_W words per row and step."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)  # [BN]
    c = tl.arange(0, CHUNK_W)  # [CW]
    acc = tl.zeros([BLOCK_N, CHUNK_W], dtype=tl.int32)
    for s in range(STEPS):
        if TILED:  # step s of this program: BN × CHUNK contiguous (a row's tail left as a gap)
            base = ((pid * STEPS + s) * BLOCK_N + r).to(tl.int64) * CHUNK_W
        else:  # row-major rows: words s·CW … of rows pid·BN + r
            base = (pid * BLOCK_N + r).to(tl.int64) * ROW_W + s * CHUNK_W
        base = tl.multiple_of(base, 4)  # 16-byte aligned: vector loads
        ok = s * CHUNK_W + c < ROW_W  # [CW]: the same bytes in both layouts
        acc ^= tl.load(W + base[:, None] + c[None, :], mask=ok[None, :], other=0)
    tl.store(OUT + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def run(copies: int) -> None:
    require_cuda()
    peaks = measure_peaks()
    # room for the tiled layout's gaps (a row's last step padded to CHUNK): ≤ 2048 B a row
    w = torch.randint(-2**31, 2**31 - 1, (copies, ROWS * 2048 // 4), dtype=torch.int32,
                      device="cuda")
    total = ROWS * ROW_BYTES
    out = torch.empty(ROWS, dtype=torch.int32, device="cuda")
    print(f"copy bandwidth {peaks.bandwidth / 1e12:.2f} TB/s; {total / 1e6:.1f} MB per call, "
          f"{copies} copies (past L2)")
    print(f"{'pattern':<22}{'µs':>8}{'TB/s':>8}{'of copy':>9}")
    results = {}
    for tiled in (False, True):
        for bn, chunk, warps in ((32, 128, 4), (32, 256, 4), (16, 512, 4), (8, 1024, 4),
                                 (4, 2048, 4), (32, 512, 8), (64, 128, 4)):
            steps = triton.cdiv(ROW_BYTES, chunk)
            progs = ROWS // bn

            def call(i: int, bn=bn, chunk=chunk, warps=warps, steps=steps, progs=progs,
                     tiled=tiled) -> None:
                jit["_stream_kernel"][(progs,)](w[i % copies], out, ROW_W=ROW_BYTES // 4, BLOCK_N=bn,
                                                CHUNK_W=chunk // 4, STEPS=steps,
                                                TILED=tiled, num_warps=warps)

            us = graph_call_us(call, calls=4 * copies)
            name = f"{'tiled' if tiled else 'rows'} {bn}×{chunk}B w{warps}"
            tbs = total / us / 1e6
            results[name] = round(us, 2)
            print(f"{name:<22}{us:8.2f}{tbs:8.2f}{tbs * 1e12 / peaks.bandwidth:9.1%}")
    record("kernels", {"bench": "access_pattern", "bytes": total, "us": results,
                       **peaks.as_dict()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="weight copies rotated (past L2)")
    run(ap.parse_args().copies)


if __name__ == "__main__":
    main()
