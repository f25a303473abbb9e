"""Code-shape options of the fused qkv + rope launch (kernels/dense_gemv_rope.py): the same bits,
a different loop for ptxas.

Why they exist (python -m bench.rope_compile, sm_90a, 20b qkv, M = 1 with a residual: the batch-1
decode's case): the default kernel holds the epilogue's inputs (cos/sin rows, slots, the ring
index) and two pointer tensors in registers across its K loop, ptxas caps it at 96 registers and
issues the 11 loads of a K step as 6 dependent waves instead of 1 (the plain norm GEMV's loop), so
each step waits ~6 memory round trips. The options take those registers back:

- one_tile: both halves' rows in one [BLOCK_N, BLOCK_K] tile (rows i and i + d/2 interleaved), one
  accumulator, the plain GEMV's loop; the halves are split after the loop.
- epi_late: 0 = positions, slots and table rows read before the loop (as before); 1 = positions
  and slots before, table rows after; 2 = all after (one more round trip in each program's tail).

GPTOSS_ROPE_GEMV=<name of CANDIDATES> picks one for launches that pass none (default: DEFAULT,
"tile_late1", timed fastest with tile_late2 on an H100).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "GPTOSS_ROPE_GEMV"


@dataclass(frozen=True)
class RopeGemvOpts:
    one_tile: bool = False
    epi_late: int = 0  # 0: all epilogue inputs before the K loop, 1: table rows after, 2: all after

    def __post_init__(self) -> None:
        if self.epi_late not in (0, 1, 2):
            raise ValueError(f"RopeGemvOpts.epi_late must be 0, 1 or 2: {self}")

    def constexprs(self) -> dict[str, object]:
        return {"ONE_TILE": self.one_tile, "EPI_LATE": self.epi_late}


CANDIDATES: dict[str, RopeGemvOpts] = {
    "base": RopeGemvOpts(),
    "late1": RopeGemvOpts(epi_late=1),
    "late2": RopeGemvOpts(epi_late=2),
    "tile": RopeGemvOpts(one_tile=True),
    "tile_late1": RopeGemvOpts(one_tile=True, epi_late=1),
    "tile_late2": RopeGemvOpts(one_tile=True, epi_late=2),
}
# H100, run 53 (bench.rope_gemv, µs, qkv + rope, residual): M=1 base 20.41, late1 16.64, tile
# 13.82, tile_late1 13.69, tile_late2 13.56, unfused 16.15; M=2 15.35 / 15.16 / 15.54 / 15.33 /
# 15.25, unfused 17.97. tile_late1 is what the decode step was timed with (tile_late2 within noise).
DEFAULT = CANDIDATES["tile_late1"]


def chosen() -> RopeGemvOpts:
    """$GPTOSS_ROPE_GEMV's candidate, else DEFAULT; an unknown name raises."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return DEFAULT
    if name not in CANDIDATES:
        raise ValueError(f"{ENV}={name!r}: not one of {sorted(CANDIDATES)}")
    return CANDIDATES[name]


__all__ = ["CANDIDATES", "DEFAULT", "ENV", "RopeGemvOpts", "chosen"]
