"""The Triton backend's kernel switches (runtime/ops_triton.TritonOps): which fused paths a
decode step takes. Read once when the engine starts, from constructor arguments first, then the
GPTOSS_* environment, then the defaults below (each the measured best on an H100, or off until
timed). Bad values raise at start-up rather than falling back silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kernels.decode_latency import FULL, WINDOW
from kernels.decode_variants import SERVING, DecodeVariant
from kernels.dense_gemv import MAX_ROWS
from kernels.env import flag as env_flag

# The dense projections (qkv, out) of batches up to this many rows run the one-launch Triton GEMV
# (kernels/dense_gemv.py) instead of cuBLAS; 0 turns it off. GPTOSS_DENSE_GEMV_ROWS overrides it.
# H100, run 45 (bench.dense_gemv, µs, GEMV / cuBLAS): qkv M=1 12.1 / 13.6, M=2 13.1 / 13.2,
# M=8 20.1 / 13.1; out M=1 10.5 / 14.4, M=2 10.2 / 14.4, M=8 14.5 / 14.4. Batch-1 decode at 4k:
# 2.394 vs 2.516 ms per step; batch 8: 6.28 ms with rows ≤ 2 vs 6.48 with rows ≤ 8.
DENSE_GEMV_ROWS = 2
# The norms before qkv and before the MoE run in their consumers' prologues (norm_linear: the
# dense GEMV, within DENSE_GEMV_ROWS; norm_moe: the fused router, kernels/moe_router.norm_fits)
# for batches up to FUSE_NORM_ROWS rows, saving the standalone norm's launch. GPTOSS_FUSE_NORM=0
# turns it off, GPTOSS_FUSE_NORM_ROWS overrides the row limit. H100, run 45: batch-1 decode at 4k
# 2.394 → 2.359 ms per step; the fused qkv GEMV (bench.norm_gemv, µs, fused / norm + GEMV) M=1
# 13.5 / 14.3, M=2 15.1 / 15.6 (fma_n8_k512_w2 tiles), M=4 24.3 / 17.1, M=8 37.5 / 22.8: on up to 2.
FUSE_NORM = True
FUSE_NORM_ROWS = 2
# Rope and the K/V cache write as the fused-norm qkv GEMV's epilogue (kernels/dense_gemv_rope.py)
# wherever that GEMV runs on a decode batch (within FUSE_NORM_ROWS and DENSE_GEMV_ROWS), saving
# rope_cache_write's launch (H100: 2.82 µs per layer). On since run 53 (H100) with the one-tile
# code shape (kernels/dense_gemv_rope_opts.py DEFAULT, tile_late1): qkv + rope at M=1 13.7 µs
# against 16.2 unfused, M=2 15.3 against 18.0; with the attention configs below, batch-1 decode
# at 4k 2.261 → 2.192 ms per step, 32k 2.500 → 2.412. GPTOSS_FUSE_ROPE=0 turns it off.
FUSE_ROPE = True
# Rope and the K/V cache write inside the decode attention launch instead
# (kernels/decode_rope_attention.py) on decode-only steps the fused-merge kernel serves (up to
# SERVING_MAX_ROWS rows), saving rope_cache_write's launch; the qkv projection is then the plain
# norm_linear. Off: slower than FUSE_ROPE (H100, run 53, batch-1 decode at 4k with the attention
# configs below: 2.199 against 2.192 ms per step; alone 2.218 against 2.261 unfused).
# GPTOSS_ROPE_ATTN=1 turns it on, and FUSE_ROPE off unless that is asked for too (an error).
ROPE_ATTN = False
# The decode attention configs (kernels/decode_latency.py names; "serving" is SERVING) of the
# sliding-window and the full layers. H100, run 53 (bench.attn_decode, µs cold / hot, 20b 4k):
# window B=1 win_bn128 3.67 / 3.27 against SERVING 4.25 / 3.70, B=8 4.23 / 3.43 against
# 4.76 / 3.79; full B=1 full_bn128_s16_once 7.97 / 6.02 against 8.77 / 6.99, B=8 30.7 / 30.0
# against 32.0 / 29.1. GPTOSS_ATTN_WINDOW / GPTOSS_ATTN_FULL override them.
ATTN_WINDOW = "win_bn128"
ATTN_FULL = "full_bn128_s16_once"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _env_variant(name: str, table: dict[str, DecodeVariant], default: str) -> DecodeVariant:
    """The kernels/decode_latency.py candidate the variable names, else default's ("serving" is
    SERVING; bench.attn_decode times them)."""
    chosen = os.environ.get(name, default).strip() or default
    if chosen != "serving" and chosen not in table:
        raise ValueError(f"{name} must be serving or one of {sorted(table)}, got {chosen!r}")
    return SERVING if chosen == "serving" else table[chosen]


@dataclass(frozen=True)
class OpsSwitches:
    dense_gemv_rows: int = DENSE_GEMV_ROWS
    fuse_norm: bool = FUSE_NORM
    fuse_norm_rows: int = FUSE_NORM_ROWS
    fuse_rope: bool = FUSE_ROPE
    rope_attn: bool = ROPE_ATTN
    attn_window: DecodeVariant = WINDOW[ATTN_WINDOW]  # the sliding layers' decode attention
    attn_full: DecodeVariant = FULL[ATTN_FULL]  # the full layers'

    def __post_init__(self) -> None:
        if not 0 <= self.dense_gemv_rows <= MAX_ROWS:
            raise ValueError(f"dense_gemv_rows must be in 0…{MAX_ROWS}, got "
                             f"{self.dense_gemv_rows}")
        if self.fuse_norm_rows < 0:
            raise ValueError(f"fuse_norm_rows must be ≥ 0, got {self.fuse_norm_rows}")
        if self.fuse_rope and self.rope_attn:
            raise ValueError("fuse_rope (GPTOSS_FUSE_ROPE) and rope_attn (GPTOSS_ROPE_ATTN) both "
                             "move rope and the K/V cache write (into the qkv GEMV, into the "
                             "decode attention): turn on at most one")

    @classmethod
    def from_env(cls, dense_gemv_rows: int | None = None, fuse_norm: bool | None = None,
                 fuse_norm_rows: int | None = None, fuse_rope: bool | None = None,
                 rope_attn: bool | None = None) -> OpsSwitches:
        """The given values; the GPTOSS_* environment (README lists it) for those left None."""
        def pick(given, read):  # noqa: ANN001, ANN202
            return read() if given is None else given

        # rope inside the attention moves the rope the default FUSE_ROPE would put in the GEMV
        attn = bool(pick(rope_attn, lambda: env_flag("GPTOSS_ROPE_ATTN", ROPE_ATTN)))
        return cls(
            dense_gemv_rows=pick(dense_gemv_rows,
                                 lambda: _env_int("GPTOSS_DENSE_GEMV_ROWS", DENSE_GEMV_ROWS)),
            fuse_norm=bool(pick(fuse_norm, lambda: env_flag("GPTOSS_FUSE_NORM", FUSE_NORM))),
            fuse_norm_rows=pick(fuse_norm_rows,
                                lambda: _env_int("GPTOSS_FUSE_NORM_ROWS", FUSE_NORM_ROWS)),
            fuse_rope=bool(pick(fuse_rope, lambda: env_flag("GPTOSS_FUSE_ROPE",
                                                            FUSE_ROPE and not attn))),
            rope_attn=attn,
            attn_window=_env_variant("GPTOSS_ATTN_WINDOW", WINDOW, ATTN_WINDOW),
            attn_full=_env_variant("GPTOSS_ATTN_FULL", FULL, ATTN_FULL),
        )
