"""Latency candidates of decode attention (kernels/decode_latency.py; Triton interpreted on CPU).

Each candidate, whichever layer kind it was made for, gives decode_attention_ref's answer on
both kinds: windows with their edges on a wrapped ring, odd lengths, a row at position 0 beside
long ones, splits without keys, dominant and negligible sinks. The new options (`sink_first`,
`early_slot`, `merge_once`) are also tested alone at small blocks where the one-round merge
holds several partials, some of them masked. fp32 / fp16 only (the interpreter's bf16 tl.dot is
wrong; bench/attn_decode.py checks bf16 on the GPU).
"""

from __future__ import annotations

import pytest
import torch

from kernels import decode_variants as dv
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.decode_latency import FULL, WINDOW, serving_for
from kernels.decode_variants import SERVING, SERVING_MAX_ROWS, DecodeVariant

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
NQ, NKV, D = 8, 2, 16
CANDIDATES = {**{f"window/{k}": v for k, v in WINDOW.items()},
              **{f"full/{k}": v for k, v in FULL.items()}}


def caches(slots: int, cap: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots + 1, cap, NKV, D, generator=g).to(dtype)
    v = torch.randn(slots + 1, cap, NKV, D, generator=g).to(dtype)
    return k, v


def sinks() -> torch.Tensor:
    return torch.linspace(-2.0, 3.0, NQ)  # from negligible to dominant


def queries(batch: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, NQ, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(cfg: DecodeVariant, dtype, window, cap, positions, splits=None) -> None:  # noqa: ANN001
    kc, vc = caches(5, cap, dtype)
    b = len(positions)
    q = queries(b, dtype)
    slots = torch.tensor([5, 0, 3, 1, 2, 4][:b])  # the dummy slot (5) first
    pos = torch.tensor(positions)
    got = decode_attention(q, kc, vc, slots, pos, sinks(), window, D**-0.5, num_splits=splits,
                           config=cfg)
    want = decode_attention_ref(q, kc, vc, slots, pos, sinks(), window, D**-0.5)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert int(dv.arrival_counters(1, torch.device("cpu")).abs().sum()) == 0


# (window, capacity, positions): a full layer with rows of 1, 300 (odd), 151 and 64 keys; a
# 128-key window on a 133-row ring (positions past it wrap, 127/128 are the window's edges)
LAYOUTS = [
    (0, 300, [0, 299, 150, 63]),
    (128, 133, [5, 127, 128, 300, 1001]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("window", "cap", "positions"), LAYOUTS)
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_latency_candidate_matches_the_reference(name, dtype, window, cap, positions):
    check(CANDIDATES[name], dtype, window, cap, positions)


@pytest.mark.parametrize("name", list(FULL))
def test_full_candidates_merge_many_splits_with_empty_ones(name) -> None:
    """Forced 8 splits: position 299 has 5 blocks of 64 (or 3 of 128) → some splits empty; the
    one-round merge must count only the active ones."""
    check(FULL[name], torch.float32, 0, 300, [299, 200, 17, 0], splits=8)


# the options alone, 16-key blocks: up to 8 partials in the one-round merge (masked tails)
SMALL = DecodeVariant(block_n=16, min_blocks=1, max_splits=8)
OPTIONS = {
    "sink_first": DecodeVariant(block_n=16, min_blocks=1, max_splits=8, sink_first=True),
    "early_slot": DecodeVariant(block_n=16, min_blocks=1, max_splits=8, early_slot=True),
    "merge_once": DecodeVariant(block_n=16, min_blocks=1, max_splits=8, merge_once=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_alone_matches_the_reference(option, dtype) -> None:
    cfg = OPTIONS[option]
    check(cfg, dtype, 0, 160, [16 * 5 - 1, 16 * 9 - 1, 3, 0], splits=8)  # 5 over 8, 9 over 8
    check(cfg, dtype, 0, 160, [16 * 5 - 1, 16 * 9 - 1, 3], splits=4)  # 2+2+1 and one empty
    check(cfg, dtype, 20, 27, [4, 19, 20, 58], splits=2)  # a window split in two, on a ring


def test_merge_once_repeats_on_the_same_counters() -> None:
    """Its last arriver also resets the counter: a second call with other lengths, then the
    first again, give the same answers (and counters at zero)."""
    cfg = OPTIONS["merge_once"]
    check(cfg, torch.float32, 0, 128, [127, 40, 0], splits=8)
    check(cfg, torch.float32, 0, 128, [9, 127, 64], splits=8)
    check(cfg, torch.float32, 0, 128, [127, 40, 0], splits=8)


def test_merge_once_refuses_more_partials_than_it_can_hold() -> None:
    """8 heads × 64 partials × d 64 fp32 would not fit one round's registers."""
    q = torch.zeros(1, 64, 64)
    kc = torch.zeros(2, 512, 8, 64)
    cfg = DecodeVariant(max_splits=64, merge_once=True)
    with pytest.raises(ValueError, match="merge_once"):
        decode_attention(q, kc, kc, torch.tensor([0]), torch.tensor([511]),
                         torch.zeros(64), 0, 0.125, config=cfg)


def test_split_counts_at_20b_shapes() -> None:
    """What each full candidate launches at B=1 (132 SMs, 8 KV heads) over a 32k cache, and
    that every window candidate keeps one split for a 128-key window."""
    assert SERVING.splits(1, 8, 32768, 132) == 33
    assert FULL["full_once32"].splits(1, 8, 32768, 132) == 32
    assert FULL["full_s16_once"].splits(1, 8, 32768, 132) == 16
    assert FULL["full_bn128_s16_once"].splits(1, 8, 32768, 132) == 16
    assert FULL["full_s16_once"].splits(8, 8, 32768, 132) == 5  # B=8: as many as today
    for cfg in WINDOW.values():
        assert cfg.splits(1, 8, 128, 132) == 1


def test_serving_for_picks_by_layer_kind_and_rows() -> None:
    win, full = WINDOW["win_bn128"], FULL["full_s16_once"]
    assert serving_for(1, 128, win, full) is win
    assert serving_for(1, 0, win, full) is full
    assert serving_for(SERVING_MAX_ROWS + 1, 128, win, full) is None
    assert serving_for(4, 0) is SERVING  # the defaults: today's choice
