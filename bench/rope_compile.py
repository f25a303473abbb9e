"""The fused qkv + rope launch (kernels/dense_gemv_rope.py) against the plain norm GEMV, compiled
for an H100 (sm_90a) on the CPU: registers, spills and the shape of the K loop in the SASS.

    python -m bench.rope_compile [--rows 1,2] [--sass DIR]

For each kernel at the 20b qkv shape (the launch's own tiles, bf16 norm scale as TritonOps passes
it), with and without a residual: the loop's instruction count, its global loads (LDG) and
"waves": how many times a load of the step is issued only after an instruction read the result
of an earlier load of the same step, i.e. the step's serialized memory round trips (1 = every
load in flight at once, as the plain GEMV). Also where the epilogue's loads sit (before or after
the loop) and any local-memory (spill) traffic.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import bench.norm_compile as nc
import kernels.dense_gemv_rope as gemv_rope
from bench.kernels_compile import BIN, build, c
from kernels.dense_gemv_rope_opts import CANDIDATES

INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_of(kernel) -> str:  # noqa: ANN001 - a compiled Triton kernel
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        subprocess.run([str(BIN / "ptxas"), "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
                       check=True, capture_output=True)
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) pairs, predicates kept, whitespace squeezed."""
    return [(int(a, 16), " ".join(t.split())) for a, t in INS.findall(sass)]


def _regs(operands: str) -> set[int]:
    return {int(r) for r in re.findall(r"\bR(\d+)\b", operands)}


def waves(body: list[str]) -> int:
    """Serialized load waves of one loop iteration (see the module docstring)."""
    pending: dict[int, int] = {}  # register → wave of the load writing it
    wave, issued = 0, 0
    for t in body:
        op = re.sub(r"^@!?U?P\w+ ", "", t)
        name, _, operands = op.partition(" ")
        if name.startswith("LDG"):
            base = int(re.match(r"R(\d+)", operands).group(1))
            width = 4 if ".128" in name else 2 if ".64" in name else 1
            pending.update({base + j: wave for j in range(width)})
            issued += 1
            continue
        parts = operands.split(",")
        srcs = _regs(",".join(parts if name.startswith(("ST", "RED", "ATOM")) else parts[1:]))
        if issued and any(pending.get(r) == wave for r in srcs):
            wave, issued = wave + 1, 0
    return wave + (1 if issued else 0)


def loop_report(sass: str) -> dict[str, int]:
    """The K loop (the last backward branch's body): size, loads, waves, FFMAs, local traffic;
    global loads before it (after the norm's) and after it."""
    ins = instructions(sass)
    at = {a: n for n, (a, _) in enumerate(ins)}
    start = end = 0
    for n, (a, t) in enumerate(ins):
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            start, end = at[int(m.group(1), 16)], n
    body = [t for _, t in ins[start:end + 1]]
    ldg = [n for n, t in enumerate(body) if "LDG" in t]
    return dict(
        instr=len(body), ldg=len(ldg), waves=waves(body),
        ldg_span=ldg[-1] - ldg[0] if ldg else 0, ffma=sum("FFMA" in t for t in body),
        local=sum(t.split()[0].lstrip("@!P0123456789 ").startswith(("STL", "LDL")) or
                  " STL" in t or " LDL" in t for t in body),
        ldg_after=sum("LDG" in t for _, t in ins[end + 1:]),
        first_ldg_before_norm=_first_dependent_chain(ins))


def _first_dependent_chain(ins: list[tuple[int, str]]) -> int:
    """Global loads issued before the first LDG.E.128 (the norm's row loads, or the table rows):
    what the program reads before its first wide load."""
    for n, (_, t) in enumerate(ins):
        if "LDG.E.128" in t:
            return sum("LDG" in u for _, u in ins[:n])
    return 0


def rope_variant(m: int, res: bool, opts_name: str):  # noqa: ANN201
    a, t = nc.rope(m, res, "bf16")
    a.update({k: c(v) for k, v in CANDIDATES[opts_name].constexprs().items()})
    return build(gemv_rope, "_gemv_rope_kernel", a, t.num_warps, t.num_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2")
    parser.add_argument("--only", default="", help="substring of the candidate names")
    parser.add_argument("--sass", type=Path, default=None, help="write each variant's SASS here")
    args = parser.parse_args()
    for m in (int(v) for v in args.rows.split(",")):
        for res in (False, True):
            label = "norm+res" if res else "norm"
            kernels = {"plain": nc.compile_dense(m, True, res, "bf16")}
            for name in CANDIDATES:
                if args.only in name:
                    kernels[f"rope.{name}"] = rope_variant(m, res, name)
            for name, k in kernels.items():
                regs, spill = nc.usage(k)
                sass = sass_of(k)
                if args.sass is not None:
                    args.sass.mkdir(parents=True, exist_ok=True)
                    (args.sass / f"{name}.M{m}.{label}.sass").write_text(sass)
                rep = " ".join(f"{key}={v}" for key, v in loop_report(sass).items())
                print(f"M{m} {label:<8} {name:<16} regs={regs:>3} spill={spill:>3} {rep}",
                      flush=True)


if __name__ == "__main__":
    main()
