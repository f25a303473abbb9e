"""Sampler behaviour a user relies on: greedy is argmax, filters never leak, seeds reproduce,
temperature sampling follows the softmax, logprobs are the model's, penalties push the right way."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.sampling import apply_penalties_ref, sample_ref, uniform_ref
from runtime.sampler import Sampler
from runtime.types import SamplingParams, SeqWork

V = 64


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, positions=None):
    b = logits.shape[0]
    full = lambda v, dt: torch.full((b,), v, dtype=dt)  # noqa: E731
    pos = torch.arange(b) if positions is None else positions
    return sample_ref(
        logits, full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32),
        full(min_p, torch.float32), full(seed, torch.long), pos,
    ).tokens


def test_temperature_zero_is_argmax() -> None:
    logits = rows(200)
    assert torch.equal(draw(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_emits_tokens_outside_the_k_largest(k: int) -> None:
    logits = rows(1).expand(4000, V).clone()  # one distribution, 4000 independent draws
    tokens = draw(logits, temperature=2.0, top_k=k)
    allowed = set(torch.topk(logits[0], k).indices.tolist())
    assert set(tokens.tolist()) <= allowed
    if k > 1:
        assert len(set(tokens.tolist())) == k  # and all of them do occur at temperature 2


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_keeps_only_the_nucleus(p: float) -> None:
    logits = rows(1, seed=1).expand(4000, V).clone()
    probs = torch.softmax(logits[0], -1)
    order = torch.argsort(probs, descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = set(order[mass_before < p].tolist())
    tokens = set(draw(logits, top_p=p).tolist())
    assert tokens <= nucleus and len(tokens) == len(nucleus)


def test_min_p_drops_tokens_below_the_fraction_of_the_best() -> None:
    logits = rows(1, seed=2).expand(4000, V).clone()
    probs = torch.softmax(logits[0], -1)
    keep = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    assert set(draw(logits, min_p=0.1).tolist()) <= keep


def test_seed_reproduces_and_different_seeds_differ() -> None:
    logits = rows(50)
    a, b = draw(logits, seed=42), draw(logits, seed=42)
    c = draw(logits, seed=43)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_uniform_noise_is_uniform_and_depends_on_seed_position_and_token() -> None:
    u = uniform_ref(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 20000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    hist = torch.histc(u[0], bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_temperature_sampling_follows_the_softmax(temperature: float) -> None:
    n = 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    logits = base.expand(n, -1).clone()
    b = n
    tokens = sample_ref(
        logits, torch.full((b,), temperature), torch.zeros(b, dtype=torch.long), torch.ones(b),
        torch.zeros(b), torch.full((b,), 3, dtype=torch.long), torch.arange(b),
    ).tokens
    expected = torch.softmax(base / temperature, -1) * n
    observed = torch.bincount(tokens, minlength=6).float()
    chi2 = (((observed - expected) ** 2) / expected).sum().item()
    assert chi2 < 25.0, f"chi² {chi2:.1f} over 5 dof: sampling does not follow the softmax"  # p≈1e-4


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = rows(3)
    works = [
        SeqWork(s, (1,), 10, True, SamplingParams(temperature=0.5, seed=s, logprobs=True, top_logprobs=4))
        for s in range(3)
    ]
    out = Sampler("cpu").sample(logits, works)
    lp = torch.log_softmax(logits, -1)
    for m, tok in enumerate(out):
        assert math.isclose(tok.logprob, lp[m, tok.token_id].item(), rel_tol=1e-5)
        ids = [t for t, _ in tok.top_logprobs]
        assert ids == torch.topk(lp[m], 4).indices.tolist()
        assert tok.top_logprobs[0][1] >= tok.top_logprobs[-1][1]


def test_no_logprobs_unless_asked() -> None:
    out = Sampler("cpu").sample(rows(1), [SeqWork(0, (1,), 0, True, SamplingParams(seed=1))])
    assert out[0].logprob is None and out[0].top_logprobs == ()


def test_penalties_lower_repeated_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties_ref(logits, [[2]], [[0, 0, 1]], [0.5], [0.25], [2.0])[0]
    # token 0: seen twice → /2 then −0.5 −0.5; token 1: once (negative) → ×2, −0.5 −0.25
    # token 2: prompt only → /2, no presence/frequency; token 3: untouched
    assert out.tolist() == pytest.approx([1.0 - 1.0, -4.0 - 0.75, 0.5, 0.5])


def test_greedy_with_penalties_avoids_the_repeated_token_through_the_sampler() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    sp = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    works = [SeqWork(0, (1,), 5, True, sp, prompt_token_ids=(2,), output_token_ids=(0,))]
    assert Sampler("cpu").sample(logits, works)[0].token_id == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5},
     {"top_k": -1}, {"min_p": 2}, {"repetition_penalty": 0}, {"presence_penalty": 3}],
)
def test_nonsense_sampling_values_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
