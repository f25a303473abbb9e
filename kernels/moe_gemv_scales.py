"""Scale words for the GEMV path's fast steps (`GemvTiles.scale_words`; opt-in, bench-only).

The fast steps (kernels/moe_gemv_dequant.py) read each (row, 32-group) exponent as one byte.
On sm_90a, ptxas places the f16 step's two byte loads ~115 instructions into the step's 168,
after the first groups' math (their address is computed late, under register pressure), and
consumes them ~50 instructions later: a second DRAM round trip in series in every step (the f32
step's BAR pins its byte loads at the top; notes/moe.md "GEMV latency"). Bytes are also too
small for cp.async (4 bytes at least).

Here each row's exponents of 4 consecutive groups are one aligned int32 word (byte j = group
4·w + j, little-endian), stored words-major like prepare_moe's bytes (kernels/moe.groups_major):
[E, G/4, N] storage, viewed [E, N, G/4], G padded to a multiple of 4 with zero bytes (never
read: the steps mask groups ≥ K/32). The kernels tell the layouts apart by the pointer's dtype
(int32: words; uint8: bytes), so the launchers pass one or the other through the same
arguments; the word loads come first in the step's PTX (`_load_scales`, _load_f32/_load_f16).
Same bytes, same products, same order: bit-identical to the byte layout. Offline (sm_90a),
ptxas still places the f16 step's word loads where it placed the bytes (notes/moe.md "GEMV
scale words"): the PTX order does not bind its scheduler.
Memory: 4/G·⌈G/4⌉ × the bytes (G = 90 for gpt-oss: 1.02×), kept only when a config needs it.
"""

from __future__ import annotations

import torch


def scale_words(scales: torch.Tensor) -> torch.Tensor:
    """[E, N, G] u8 exponents (any strides) → [E, N, ⌈G/4⌉] int32 words with [E, ⌈G/4⌉, N]
    storage: word (e, n, w) holds scales[e, n, 4w + j] in byte j (zero past G)."""
    if scales.dtype != torch.uint8 or scales.dim() != 3:
        raise ValueError(f"scale_words: expected [E, N, G] u8 exponents, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    e, n, g = scales.shape
    g4 = -(-g // 4)
    padded = torch.zeros(e, g4 * 4, n, dtype=torch.uint8, device=scales.device)  # [E, 4·G4, N]
    padded[:, :g] = scales.transpose(1, 2)
    # [E, G4, 4, N] → [E, G4, N, 4]: a word's 4 bytes adjacent, group 4w + j at byte j
    as_bytes = padded.view(e, g4, 4, n).transpose(2, 3).contiguous()
    return as_bytes.view(torch.int32).view(e, g4, n).transpose(1, 2)  # [E, N, G4]


def scale_bytes(words: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse, for tests: [E, N, G4] int32 words → [E, N, groups] u8."""
    e, n, g4 = words.shape
    b = words.transpose(1, 2).contiguous().view(torch.uint8).view(e, g4, n, 4)
    return b.permute(0, 2, 1, 3).reshape(e, n, g4 * 4)[:, :, :groups]
