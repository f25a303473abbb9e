"""Latency candidates for batch-1 decode attention, one set per layer kind (timed in run 53;
runtime/ops_switches.py picks win_bn128 and full_bn128_s16_once as the defaults).

gpt-oss-20b at B=1: a sliding layer (window 128) reads 0.26 MB and a full layer at 4k 8.4 MB,
yet the serving config (`decode_variants.SERVING`) takes ≈ 3.6 / 7.1 µs for them (L2-warm bench)
and the decode step's timeline ≈ 5.9–6.4 µs per launch on average: both are chains of dependent
round trips, not bandwidth (notes/kernels.md, "Decode attention v3"). What each chain holds:

- sliding: 8 programs (one per KV head), q/slot/position → K/V of 2 blocks of 64 keys → 2 blocks
  of math → the sinks' load (issued only after the loop) → the store.
- full, context 4096, capacity 32768: 264 programs (33 splits, 32 with 2 blocks each) → partial
  stores, fence, counter atomic → the last program of each KV head loads m/ℓ, then 32 acc
  partials (64 KB) in 2 rounds of 16: 3 round trips from one SM after the atomic.

The candidates here cut links of those chains (`sink_first`, one 128-key block, `merge_once`,
fewer and fatter splits); each is a `DecodeVariant`, passed as decode_attention's `config`.
`bench/attn_decode.py` checks them against the reference and times them against SERVING.
The runtime would pick one per layer kind: runtime/ops_triton.py `_decode_variant(rows)` gains
the layer's window (`serving_for(rows, window)` below shows the shape of that choice).
"""

from __future__ import annotations

from kernels.decode_variants import SERVING, SERVING_MAX_ROWS, DecodeVariant

# Both kinds: today's SERVING with only the slot load moved up (position → K/V in 2 round trips)
SLOT_ONLY = DecodeVariant(num_stages=3, early_slot=True)
_FAST = {"sink_first": True, "early_slot": True}  # every candidate below has both

# Sliding-window layers (window 128): one split per (row, KV head) either way (no partials,
# no counter); these shorten the single program's chain.
WINDOW: dict[str, DecodeVariant] = {
    "serving_slot": SLOT_ONLY,
    # + the sinks loaded with q: one round trip less after the keys
    "win_sink": DecodeVariant(num_stages=3, **_FAST),
    # all 128 keys in one block: one load round, one pass of math; K and V issued together
    "win_bn128": DecodeVariant(block_n=128, num_stages=2, kv_together=True, **_FAST),
    # ... without cp.async/shared-memory staging (plain loads straight to registers)
    "win_bn128_s1": DecodeVariant(block_n=128, num_stages=1, kv_together=True, **_FAST),
    # ... with 8 warps: half the per-warp work of the two 16×128×64 products and the softmax
    "win_bn128_w8": DecodeVariant(block_n=128, num_warps=8, num_stages=1, kv_together=True,
                                  **_FAST),
}

# Full layers: the merge tail is the lever (one program per KV head after the atomic).
FULL: dict[str, DecodeVariant] = {
    "serving_slot": SLOT_ONLY,
    # today's split count (≤ 32 now: 32 active at 4k either way), the merge in one load round
    "full_once32": DecodeVariant(num_stages=3, max_splits=32, merge_once=True, **_FAST),
    # ... with 8 warps: 64 partial floats per thread instead of 128
    "full_once32_w8": DecodeVariant(num_warps=8, num_stages=3, max_splits=32, merge_once=True,
                                    **_FAST),
    # ≤ 16 splits (128 programs at B=1, ~1 per SM), 4 blocks of 64 each, 3 of them in flight;
    # the merge reads 32 KB in one round
    "full_s16_once": DecodeVariant(num_stages=4, max_splits=16, merge_once=True, **_FAST),
    # ≤ 16 splits of 2 × 128-key blocks (64 KB in flight per program), one-round merge
    "full_bn128_s16_once": DecodeVariant(block_n=128, num_stages=3, min_blocks=2, max_splits=16,
                                         merge_once=True, **_FAST),
}


def serving_for(rows: int, window: int, windowed: DecodeVariant = SERVING,
                full: DecodeVariant = SERVING) -> DecodeVariant | None:
    """The config a decode call of `rows` rows on a layer with `window` (0 = full) would take
    with a per-kind choice: `windowed` on sliding layers, `full` on full ones, and the two-launch
    kernels (None) beyond SERVING_MAX_ROWS as today."""
    if rows > SERVING_MAX_ROWS:
        return None
    return windowed if window > 0 else full
