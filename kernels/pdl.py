"""Programmatic dependent launch (PDL, sm_90+) for the decode step's kernels.

A batch-1 decode step is ~210 short kernels in a CUDA graph; between two of them the GPU drains
the first (its last programs finish while most SMs idle) and ramps up the second (launch, then
every program's first DRAM round trip). With PDL each kernel is launched with programmatic
stream serialization, so the next kernel's programs may start while this one still runs:

    kernel i:    [pre-wait: read only what no kernel in flight writes] → griddepcontrol.wait
                 → griddepcontrol.launch_dependents → body
    kernel i+1:  launched once every program of kernel i has passed launch_dependents, i.e.
                 once kernel i's wait has returned: kernel i−1 is complete and visible.

So kernel i+1's pre-wait section overlaps kernel i's whole body. It may read constants (weights,
biases) and anything written by kernel i−1 or earlier (complete before i+1 starts), never kernel
i's outputs; it must write nothing. The GEMVs use it to pull their weight rows into L2
(`prefetch_rows`) while their predecessor runs: a weight stream that starts at DRAM speed
instead of after a launch and a round trip. griddepcontrol.wait returns at once when the
predecessor was not launched with PDL (cuBLAS, torch kernels), so mixing is safe.

Off by default: measured slower (H100, run 47, notes/gpu-runs.md): batch-1 decode at 4k 2.340 →
2.490 ms per step, 32k 2.558 → 2.763, batch 8 6.28 → 6.56. GPTOSS_PDL=1 turns it on for
further experiments. Without the weight prefetch (GPTOSS_PDL_PREFETCH=0; run 53, with the fused
rope and the attention configs on) it is mixed: batch-1 decode at 4k 2.129 → 2.103 ms per step
(overlapped), 32k 2.356 → 2.398, which would put 32k 14 % behind 4k (target ≤ 10 %): still off.
The interpreter and CPU tensors never use it (the instructions are PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.env import flag
from kernels.jit import KernelSet, interpret_forced

ENV = "GPTOSS_PDL"
PREFETCH_ENV = "GPTOSS_PDL_PREFETCH"
DEFAULT = False
_override: list[bool] = []  # set_enabled's value, when set (tests, benches)


def enabled() -> bool:
    """PDL on for compiled launches: set_enabled's value, else $GPTOSS_PDL, else DEFAULT."""
    if _override:
        return _override[-1]
    return flag(ENV, DEFAULT)


def set_enabled(on: bool | None) -> None:
    """Force PDL on/off for the following launches (None: back to the environment)."""
    _override.clear()
    if on is not None:
        _override.append(bool(on))


def launch_args(device: torch.device, row_bytes: int | None = None) -> dict:
    """The launch keywords of a PDL-capable kernel: its PDL constexpr and Triton's launch_pdl
    (programmatic stream serialization), both off in the interpreter and on CPU tensors; with
    row_bytes, also prefetch_rows' SECTORS (0 = no prefetch: PDL off, or GPTOSS_PDL_PREFETCH=0)."""
    on = enabled() and device.type == "cuda" and not interpret_forced()
    args = {"PDL": on, "launch_pdl": on}
    if row_bytes is not None:
        args["SECTORS"] = sectors(row_bytes) if on and flag(PREFETCH_ENV, True) else 0
    return args


def wait_then_release(PDL: tl.constexpr):
    """The kernel's predecessor complete and visible, then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def prefetch_rows(row_ptrs, row_len, SECTORS: tl.constexpr, PDL: tl.constexpr):
    """Ask L2 for row_len elements from each of row_ptrs [R] (every row's first element, in
    bounds): SECTORS 32-byte sectors per row (a power of two ≥ the row's sectors, see
    `sectors`; those past a row's end repeat its last element: never out of bounds). A hint:
    no effect on results; nothing without PDL or with SECTORS = 0."""
    if PDL and SECTORS > 0:
        EL: tl.constexpr = 32 // (row_ptrs.dtype.element_ty.primitive_bitwidth // 8)
        e = tl.minimum(tl.arange(0, SECTORS) * EL, row_len - 1)  # [SECTORS]
        ptr = row_ptrs[:, None] + e[None, :]  # [R, SECTORS]
        # one L2 prefetch per sector, evict_last: the lines must survive the predecessor's
        # own streaming until this kernel reads them; fire and forget
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0;", "=r,l",
                                  [ptr], dtype=tl.int32, is_pure=False, pack=1)


def register(jit: KernelSet) -> None:
    """Registers the helpers in a kernel file's KernelSet (which runs them with that file's
    globals: the griddepcontrol builtins they call are put there too)."""
    jit._globals.setdefault("gdc_wait", gdc_wait)
    jit._globals.setdefault("gdc_launch_dependents", gdc_launch_dependents)
    for fn in (wait_then_release, prefetch_rows):
        jit._globals.setdefault(fn.__name__, fn)
        jit(fn)


def sectors(row_bytes: int) -> int:
    """SECTORS for prefetch_rows of rows of row_bytes bytes."""
    return triton.next_power_of_2(max(1, triton.cdiv(row_bytes, 32)))


__all__ = ["DEFAULT", "ENV", "PREFETCH_ENV", "enabled", "launch_args", "prefetch_rows", "register",
           "sectors", "set_enabled", "wait_then_release"]
