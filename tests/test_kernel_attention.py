"""Decode and prefill attention (Triton, interpreted on CPU tensors) against their references.

Small shapes with the same structure as gpt-oss (GQA, sinks, sliding window on ring caches):
odd lengths, window edges, slots at different positions, the dummy (last) slot, a slot at its
first token and one filling its whole cache, ring wrap-around. fp32 / fp16 only: the interpreter's
tl.dot on bf16 is wrong (the GPU tests cover bf16).
"""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.prefill_attention import prefill_attention, prefill_attention_ref

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def caches(slots: int, cap: int, nkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots + 1, cap, nkv, d, generator=g).to(dtype)
    v = torch.randn(slots + 1, cap, nkv, d, generator=g).to(dtype)
    return k, v


def sinks(nq: int) -> torch.Tensor:
    return torch.linspace(-2.0, 3.0, nq)  # from negligible to dominant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("window", "cap", "positions"),
    [
        (0, 70, [0, 1, 16, 69]),  # first token, block edge, a full cache
        (0, 70, [33, 47, 5, 62]),
        (8, 70, [7, 8, 9, 40]),  # window edges: p − W + 1 = 0, 1, 2
        (8, 13, [12, 13, 50, 101]),  # ring of 13 positions, wrapped several times
    ],
)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_attention_matches_reference(dtype, window, cap, positions, splits) -> None:
    nq, nkv, d = 8, 2, 16
    kc, vc = caches(4, cap, nkv, d, dtype)
    b = len(positions)
    q = torch.randn(b, nq, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    slots = torch.tensor([4, 0, 2, 1])[:b]  # the dummy slot (4) too
    pos = torch.tensor(positions)
    got = decode_attention(q, kc, vc, slots, pos, sinks(nq), window, d**-0.5,
                           block_n=16, num_splits=splits)
    want = decode_attention_ref(q, kc, vc, slots, pos, sinks(nq), window, d**-0.5)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_attention_ignores_cache_beyond_each_slots_length() -> None:
    nq, nkv, d = 4, 1, 16
    kc, vc = caches(2, 64, nkv, d, torch.float32)
    q = torch.randn(2, nq, d)
    slots, pos = torch.tensor([0, 1]), torch.tensor([5, 20])
    before = decode_attention(q, kc, vc, slots, pos, sinks(nq), 0, 0.25, block_n=16, num_splits=4)
    kc[0, 6:], vc[0, 6:] = float("nan"), float("nan")  # garbage after slot 0's length
    kc[1, 21:] = 1e4
    after = decode_attention(q, kc, vc, slots, pos, sinks(nq), 0, 0.25, block_n=16, num_splits=4)
    assert torch.equal(before, after)


def test_decode_attention_rejects_bad_shapes() -> None:
    kc, vc = caches(2, 16, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 16), kc, vc, torch.tensor([0]), torch.tensor([0]),
                         sinks(3), 0, 0.25)
    with pytest.raises(ValueError, match="sinks"):
        decode_attention(torch.randn(1, 4, 16), kc, vc, torch.tensor([0]), torch.tensor([0]),
                         sinks(2), 0, 0.25)
    with pytest.raises(ValueError, match="differ"):
        decode_attention(torch.randn(1, 4, 16).half(), kc, vc, torch.tensor([0]),
                         torch.tensor([0]), sinks(4), 0, 0.25)
    with pytest.raises(ValueError, match="slot_ids and positions must be integer"):
        decode_attention(torch.randn(1, 4, 16), kc, vc, torch.tensor([0]), torch.tensor([0.0]),
                         sinks(4), 0, 0.25)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        decode_attention(torch.randn(1, 4, 16), kc, vc, torch.tensor([0]), torch.tensor([0]),
                         sinks(4), 0, 0.25, block_n=24)


# (slot, start position, chunk length) per packed sequence
PREFILL_CASES = [
    (0, 70, [(0, 0, 1)]),  # one token
    (0, 70, [(0, 0, 19), (3, 4, 0), (2, 0, 5)]),  # fresh prompts, odd lengths, an empty chunk
    (0, 70, [(1, 30, 23), (3, 69, 1), (0, 7, 2)]),  # chunks after cached context, a decode row
    (8, 70, [(0, 0, 13), (2, 3, 6)]),  # window edge inside the chunk
    (8, 24, [(1, 50, 17), (4, 90, 3)]),  # ring: W + chunk − 1 ≤ 24, wrapped, the dummy slot
    (5, 9, [(2, 31, 5)]),  # ring exactly W + chunk − 1 long
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("window", "cap", "seqs"), PREFILL_CASES)
def test_prefill_attention_matches_reference(dtype, window, cap, seqs) -> None:
    nq, nkv, d = 8, 2, 16
    kc, vc = caches(4, cap, nkv, d, dtype)
    cu = [0]
    for _, _, n in seqs:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], nq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    slots, starts = [s for s, _, _ in seqs], [p for _, p, _ in seqs]
    got = prefill_attention(q, kc, vc, cu, slots, starts, sinks(nq), window, d**-0.5,
                            block_t=4, block_n=16)
    want = prefill_attention_ref(q, kc, vc, cu, slots, starts, sinks(nq), window, d**-0.5)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_prefill_attention_with_many_heads_per_kv_head() -> None:
    """G = 8 (the 20b ratio) with 64-row tiles (8 tokens × 8 heads)."""
    nq, nkv, d = 16, 2, 16
    kc, vc = caches(2, 40, nkv, d, torch.float32)
    cu, slots, starts = [0, 11, 20], [0, 1], [0, 20]
    q = torch.randn(20, nq, d)
    got = prefill_attention(q, kc, vc, cu, slots, starts, sinks(nq), 0, 0.25, block_n=16)
    want = prefill_attention_ref(q, kc, vc, cu, slots, starts, sinks(nq), 0, 0.25)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_prefill_attention_rejects_a_chunk_the_ring_cannot_hold() -> None:
    kc, vc = caches(1, 10, 1, 16, torch.float32)
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="ring"):
        prefill_attention(q, kc, vc, [0, 8], [0], [20], sinks(2), 4, 0.25)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(q, kc, vc, [0, 7], [0], [0], sinks(2), 0, 0.25)
