"""Decode attention candidates (kernels/decode_variants.py; Triton interpreted on CPU tensors).

Every named candidate gives decode_attention_ref's answer, and the fused merge (the last split
program of each (row, KV head) merges) holds up where it is easy to get wrong: rows whose later
splits have no keys, a row at position 0 next to a long one, many splits per row, window edges
on a wrapped ring, and repeated calls on the same arrival counters. fp32 / fp16 only: the
interpreter's tl.dot on bf16 is wrong (bench.kernels --decode-variants checks bf16 on the GPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import decode_variants as dv
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.decode_variants import CANDIDATES, DecodeVariant

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
NQ, NKV, D = 8, 2, 16


def caches(slots: int, cap: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots + 1, cap, NKV, D, generator=g).to(dtype)
    v = torch.randn(slots + 1, cap, NKV, D, generator=g).to(dtype)
    return k, v


def sinks() -> torch.Tensor:
    return torch.linspace(-2.0, 3.0, NQ)  # from negligible to dominant


def queries(batch: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, NQ, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def counters_left() -> int:
    return int(dv.arrival_counters(1, torch.device("cpu")).abs().sum())


def run(kw: dict, q, kc, vc, slots, pos, window, splits=None):  # noqa: ANN001, ANN201
    got = decode_attention(q, kc, vc, slots, pos, sinks(), window, D**-0.5, num_splits=splits,
                           **kw)
    want = decode_attention_ref(q, kc, vc, slots, pos, sinks(), window, D**-0.5)
    return got, want


# (window, cache capacity, positions): with 64-key blocks and 4 splits, position 299 has 5 blocks
# → 2 per split → 3 splits with work and one without; 150 → 3 splits of one block; 0 and 63 fit
# one split (the output is written without a merge) beside the long rows in the same batch.
LAYOUTS = [
    (0, 300, [0, 299, 150, 63]),
    (100, 131, [5, 99, 100, 130, 377]),  # window edges p − W + 1 = 0, 1; a ring wrapped twice
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("window", "cap", "positions"), LAYOUTS)
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_candidate_matches_the_reference(name, dtype, window, cap, positions) -> None:
    kc, vc = caches(5, cap, dtype)
    b = len(positions)
    slots = torch.tensor([5, 0, 3, 1, 2][:b])  # the dummy slot (5) first
    got, want = run(CANDIDATES[name], queries(b, dtype), kc, vc, slots, torch.tensor(positions),
                    window, splits=4)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert counters_left() == 0


# 16-key blocks, up to 8 splits, merged 2 partials per load round (rounds with masked tails)
SMALL = DecodeVariant(block_n=16, min_blocks=1, max_splits=8, merge_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_long_row_over_many_splits(dtype) -> None:
    kc, vc = caches(1, 256, dtype)
    for pos in (255, 200, 17):  # 16 blocks → 8 splits of 2; 13 → 7 of 2; 2 → 2 of 1
        got, want = run({"config": SMALL}, queries(1, dtype), kc, vc, torch.tensor([1]),
                        torch.tensor([pos]), 0)
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert counters_left() == 0


def test_splits_without_work_do_not_hold_back_the_merge() -> None:
    """5 key blocks over 4 splits: 2 + 2 + 1 and an empty fourth split; 9 blocks over 8: 2 ×
    4 + 1 and three empty. The merge must happen (and count only the splits with work)."""
    kc, vc = caches(2, 160, torch.float32)
    pos = torch.tensor([16 * 5 - 1, 16 * 9 - 1, 3])
    got, want = run({"config": SMALL}, queries(3, torch.float32), kc, vc, torch.tensor([0, 1, 2]),
                    pos, 0, splits=8)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    got, want = run({"config": SMALL}, queries(3, torch.float32), kc, vc, torch.tensor([0, 1, 2]),
                    pos, 0, splits=4)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_fused_merge_reuses_its_counters_call_after_call() -> None:
    """The last arriver resets its counter: the same counters serve every later call (and CUDA
    graph replay) without a memset, whatever the lengths in between."""
    kc, vc = caches(3, 128, torch.float32)
    q, slots = queries(3, torch.float32), torch.tensor([0, 1, 2])
    a, b = torch.tensor([127, 40, 0]), torch.tensor([9, 127, 64])
    first, want_a = run({"config": SMALL}, q, kc, vc, slots, a, 0, splits=8)
    between, want_b = run({"config": SMALL}, q, kc, vc, slots, b, 0, splits=8)
    again, _ = run({"config": SMALL}, q, kc, vc, slots, a, 0, splits=8)
    torch.testing.assert_close(first, want_a, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(between, want_b, rtol=2e-5, atol=2e-5)
    assert torch.equal(first, again)
    assert counters_left() == 0


def test_the_split_count_follows_the_config_and_is_capped() -> None:
    cfg = DecodeVariant(block_n=64, programs_per_sm=2, min_blocks=4, max_splits=64)
    assert cfg.splits(1, 8, 32768, 132) == 33  # 2 × 132 programs over 8 KV heads
    assert cfg.splits(1, 8, 4096, 132) == 16  # ≥ 4 blocks each
    assert cfg.splits(64, 8, 4096, 132) == 1
    assert dataclasses.replace(cfg, programs_per_sm=8).splits(1, 8, 32768, 132) == 64
    kc, vc = caches(1, 64, torch.float32)
    cap2 = DecodeVariant(block_n=16, min_blocks=1, max_splits=2)
    got, want = run({"config": cap2}, queries(1, torch.float32), kc, vc, torch.tensor([0]),
                    torch.tensor([63]), 0, splits=64)  # 64 asked, 2 run
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_counters_grow_and_outgrown_ones_stay_alive() -> None:
    dev = torch.device("cpu")
    small = dv.arrival_counters(1, dev)
    bigger = dv.arrival_counters(small.numel() + 1, dev)
    assert bigger.numel() > small.numel() and int(bigger.abs().sum()) == 0
    assert any(t is small for t in dv._OUTGROWN)  # a captured graph may still use it
    assert dv.arrival_counters(1, dev) is bigger


@pytest.mark.parametrize("bad", [dict(block_n=48), dict(block_n=8), dict(max_splits=3),
                                 dict(merge_splits=3), dict(merge_splits=-2),
                                 dict(num_warps=3), dict(num_stages=0), dict(min_blocks=0)])
def test_decode_variant_rejects_bad_settings(bad) -> None:
    with pytest.raises(ValueError, match="DecodeVariant"):
        DecodeVariant(**bad)
