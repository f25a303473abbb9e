"""GEMM 2 of the one-token GEMV candidates (kernels/moe_configs_gemv2one.py) compiled for sm_90a
on the CPU: registers, spills and the main loop's load placement, beside GEMV_ONE's.

    python -m bench.gemv2one_compile [--sass DIR]

(bench.moe_compile's report; its GEMM 1 lines are GEMV_ONE's for every candidate.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.moe_compile import report_gemv
from kernels.moe_configs_gemv import GEMV_ONE
from kernels.moe_configs_gemv2one import GEMV2ONE_CANDIDATES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", type=Path, default=None, help="write each kernel's SASS here")
    args = ap.parse_args(argv)
    for name, mc in {"GEMV_ONE": GEMV_ONE, **GEMV2ONE_CANDIDATES}.items():
        report_gemv(name, mc, args.sass)


if __name__ == "__main__":
    main()
