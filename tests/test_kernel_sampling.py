"""Triton sampling (interpreted on CPU tensors) against kernels.sampling.sample_ref.

Both use the same counter-based Gumbel noise, so wherever the filters keep the same tokens the
sampled tokens are identical: comparing tokens over many seeds checks the filters too. The vocab
is cut into several small chunks here (the GPU uses 4096-token chunks) so that the cross-chunk
merges and the radix passes' atomics are exercised.
"""

from __future__ import annotations

import pytest
import torch

import kernels.sampling as sampling
from kernels.sampling import sample, sample_ref, seed_to_int64

# (temperature, top_k, top_p, min_p) per row
ROWS = [
    (0.0, 0, 1.0, 0.0),  # greedy
    (1.0, 1, 1.0, 0.0),  # top_k = 1 is greedy too
    (1.0, 0, 1.0, 0.0),  # plain sampling
    (0.7, 5, 1.0, 0.0),  # top-k
    (1.3, 0, 0.6, 0.0),  # top-p
    (1.0, 0, 1.0, 0.2),  # min-p
    (0.9, 40, 0.8, 0.05),  # all three
    (2.0, 300, 0.2, 0.0),  # k beyond the vocab, a small nucleus
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "BLOCK_V", 128)
    monkeypatch.setattr(sampling, "SUB", 32)  # 4 sub-blocks per chunk: the skipping is exercised


def params(rows, seeds, positions):
    t, k, p, m = zip(*rows, strict=True)
    return dict(
        temperature=torch.tensor(t), top_k=torch.tensor(k, dtype=torch.long),
        top_p=torch.tensor(p), min_p=torch.tensor(m),
        seeds=torch.tensor([seed_to_int64(s) for s in seeds], dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
    )


def both(logits, rows, seeds, positions, n_top=0, raw=None):
    kw = params(rows, seeds, positions)
    got = sample(logits, **kw, num_top_logprobs=n_top, raw_logits=raw)
    want = sample_ref(logits, **kw, num_top_logprobs=n_top, raw_logits=raw)
    return got, want


@pytest.mark.parametrize("trial", range(2))
def test_sampled_tokens_equal_the_reference(trial) -> None:
    g = torch.Generator().manual_seed(trial)
    vocab = 300  # 3 chunks, the last one partial
    logits = torch.randn(len(ROWS), vocab, generator=g) * 2.5
    seeds = [trial * 1000 + i for i in range(len(ROWS))]
    seeds[-1] = 2**64 - 1  # the largest uint64 seed
    positions = [trial * 7 + i for i in range(len(ROWS))]
    got, want = both(logits, ROWS, seeds, positions, n_top=3)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(got.top_ids, want.top_ids)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=0, atol=1e-5)


def test_ties_at_the_top_k_and_top_p_boundaries_are_kept() -> None:
    # integer logits: many exact ties; the k-th value and the nucleus edge fall inside tie groups
    g = torch.Generator().manual_seed(5)
    vocab = 150
    base = torch.randint(0, 6, (1, vocab), generator=g).float()
    rows = [(1.0, 7, 1.0, 0.0), (1.0, 0, 0.3, 0.0), (1.0, 0, 0.5, 0.0), (0.5, 12, 0.9, 0.3)]
    logits = base.expand(len(rows), vocab).contiguous()
    for trial in range(2):
        seeds = [trial * 10 + i for i in range(len(rows))]
        got, want = both(logits, rows, seeds, [trial] * len(rows))
        assert got.tokens.tolist() == want.tokens.tolist()


def test_uniform_logits_top_p_keeps_the_whole_tie() -> None:
    logits = torch.zeros(2, 130)
    rows = [(1.0, 0, 0.5, 0.0), (1.0, 0, 0.01, 0.0)]
    tokens = set()
    for trial in range(4):
        got, want = both(logits, rows, [trial, trial + 100], [0, 0])
        assert got.tokens.tolist() == want.tokens.tolist()
        tokens.update(got.tokens.tolist())
    assert len(tokens) > 4  # all tokens tie for τ: sampling is not stuck on a few ids


def test_greedy_picks_the_first_of_equal_maxima() -> None:
    logits = torch.zeros(1, 150)
    logits[0, [70, 20, 140]] = 3.0  # maxima in different chunks
    got, want = both(logits, [(0.0, 0, 1.0, 0.0)], [0], [0])
    assert got.tokens.tolist() == want.tokens.tolist() == [20]


def test_a_row_samples_the_same_token_whatever_shares_its_batch() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 100, generator=g)
    rows = [(1.0, 0, 0.9, 0.0)] * 4
    together, _ = both(logits, rows, [11, 12, 13, 14], [5, 6, 7, 8])
    alone, _ = both(logits[2:3], rows[:1], [13], [7])
    assert together.tokens[2] == alone.tokens[0]


def test_logprobs_come_from_the_raw_logits() -> None:
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 100, generator=g)
    penalized = raw - 2.0 * (torch.arange(100) % 3 == 0).float()
    rows = [(0.0, 0, 1.0, 0.0), (0.8, 0, 1.0, 0.0)]
    got, want = both(penalized, rows, [1, 2], [3, 4], n_top=2, raw=raw)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("vocab", "rows"),
    [
        (1, [(1.0, 0, 0.9, 0.1), (0.0, 0, 1.0, 0.0)]),  # one token: every filter keeps it
        (97, [(0.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (0.5, 0, 1.0, 0.0)]),  # greedy + plain only
        (257, [(1.0, 0, 1.0, 0.3)] * 2),  # min-p only: the draw pass without any radix pass
        (383, [(1.1, 383, 1.0, 0.0), (1.1, 10_000, 1.0, 0.0), (0.9, 382, 0.95, 0.0)]),  # k ≥ V
        (200, [(1.0, 0, 1.0, 0.0), (1.0, 0, 0.999999, 0.0), (1.0, 3, 1.0, 0.0)]),  # top_p ≈ 1
    ],
)
def test_odd_vocabs_and_filters_that_keep_everything(vocab, rows) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(rows), vocab, generator=g) * 3
    for trial in range(2):
        got, want = both(logits, rows, [trial + i for i in range(len(rows))], [trial] * len(rows))
        assert got.tokens.tolist() == want.tokens.tolist()
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)


def test_one_row_of_each_kind_alone_and_in_a_mixed_batch() -> None:
    g = torch.Generator().manual_seed(21)
    vocab = 333
    logits = torch.randn(len(ROWS), vocab, generator=g) * 2
    seeds, positions = [50 + i for i in range(len(ROWS))], [9 + i for i in range(len(ROWS))]
    mixed, want = both(logits, ROWS, seeds, positions)
    assert mixed.tokens.tolist() == want.tokens.tolist()
    for i, row in enumerate(ROWS):  # B = 1 for every kind of row
        alone, want1 = both(logits[i : i + 1], [row], seeds[i : i + 1], positions[i : i + 1])
        assert alone.tokens.tolist() == want1.tokens.tolist() == [mixed.tokens[i].item()]


def test_a_peaked_row_keeps_few_tokens_and_a_flat_one_many() -> None:
    # the top-p threshold in the dense middle of the keys (flat) and among a few outliers (peaked)
    g = torch.Generator().manual_seed(4)
    vocab = 300
    flat = torch.randn(1, vocab, generator=g) * 0.1
    peaked = torch.randn(1, vocab, generator=g)
    peaked[0, [3, 150, 299]] += torch.tensor([12.0, 11.5, 11.0])
    logits = torch.cat([flat, peaked, flat, peaked])
    rows = [(1.0, 0, 0.9, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 50, 0.5, 0.0), (1.0, 2, 0.99, 0.0)]
    seen = set()
    for trial in range(3):
        got, want = both(logits, rows, [trial * 4 + i for i in range(4)], [trial] * 4)
        assert got.tokens.tolist() == want.tokens.tolist()
        seen.add(got.tokens[1].item())
    assert seen <= {3, 150, 299}


def test_sample_rejects_bad_inputs() -> None:
    kw = params([(1.0, 0, 1.0, 0.0)], [0], [0])
    with pytest.raises(ValueError, match="fp32"):
        sample(torch.zeros(1, 10, dtype=torch.float16), **kw)
    kw["top_k"] = torch.tensor([0.5])
    with pytest.raises(ValueError, match="top_k"):
        sample(torch.zeros(1, 10), **kw)
