"""Prompt-carrying steps through StepGraphs equal the plain eager step.

On the CPU nothing is captured, but the same padded pass over the same static buffers runs
(padding sequence on the dummy slot, a fixed-size tile table with empty tiles, the final norm of
every row): if that pass is right here, the GPU graph replays it (tests/test_gpu_runtime.py
checks replay = eager). fp32 so that differences would be the padding's own.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.prefill_attention import (
    max_prefill_tiles,
    prefill_attention,
    prefill_attention_ref,
    prefill_table,
)
from runtime.batch import build_batch
from runtime.config import preset
from runtime.engine import Engine, EngineConfig
from runtime.kv_cache import CacheShape, KVCache
from runtime.model import Model
from runtime.ops import TorchOps
from runtime.ops_triton import TritonOps
from runtime.step_graphs import StepGraphs, step_buckets
from runtime.types import PREVIOUS_TOKEN, SamplingParams, SeqWork, StepPlan

SLOTS, CONTEXT, CHUNK = 3, 64, 8  # sliding layers: a ring of 16 + 8 − 1 = 23 positions


def test_buckets_cover_every_step_size_with_little_padding() -> None:
    b = step_buckets(2048, max_pad=639)
    assert b[:6] == [16, 32, 48, 64, 96, 128] and b[-1] == 2048
    assert b == sorted(set(b))
    gaps = [y - x for x, y in zip([0] + b, b, strict=False)]
    assert max(gaps) == 32 and len(b) == 66
    assert step_buckets(40, max_pad=23) == [16, 32, 40]
    tiny = step_buckets(100, max_pad=10)  # the padding must fit the smallest cache
    assert tiny[-1] == 100 and max(y - x for x, y in zip([0] + tiny, tiny, strict=False)) <= 10
    with pytest.raises(ValueError):
        step_buckets(0, 8)


def test_empty_tiles_in_a_padded_table_change_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    nq, nkv, d, cap = 8, 2, 16, 40
    kc = torch.randn(4, cap, nkv, d, generator=g)
    vc = torch.randn(4, cap, nkv, d, generator=g)
    cu, slots, starts = [0, 1, 12, 13], [2, 0, 1], [30, 5, 0]
    q = torch.randn(cu[-1], nq, d, generator=g)
    sinks = torch.randn(nq, generator=g)
    block_t = 4
    table = prefill_table(cu, slots, starts, cu[-1], 4, cap, 0, block_t, q.device)
    size = max_prefill_tiles(cu[-1], 4, block_t)
    assert size >= table.shape[0] + 3
    padded = torch.zeros(size, 4, dtype=torch.int32)
    padded[:, 3] = 3  # empty tiles point at the dummy slot
    padded[: table.shape[0]] = table
    want = prefill_attention_ref(q, kc, vc, cu, slots, starts, sinks, 0, 0.25)
    got = prefill_attention(q, kc, vc, [], [], [], sinks, 0, 0.25, block_t=block_t, table=padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def make_model(ops) -> Model:  # noqa: ANN001
    cfg = preset("tiny")
    weights = random_weights(cfg)
    shape = CacheShape(SLOTS, CONTEXT, CHUNK)
    return Model(weights, KVCache(cfg, shape, "cpu", torch.float32), CONTEXT, ops=ops)


def random_weights(cfg):  # noqa: ANN001, ANN201
    from runtime.synthetic import random_weights as make

    return make(cfg, seed=5, device="cpu", dtype=torch.float32)


def mixed_steps() -> list[StepPlan]:
    """Slot 0 prefills 21 tokens in chunks of 8 then decodes past the window and around the
    ring; slot 1 prefills behind it; slot 2 is a one-token prompt (a chunk that looks like a
    decode) and then decodes. Every plan carries at least one prompt chunk."""
    rng = random.Random(1)
    plans = [StepPlan((SeqWork(0, tuple(rng.randrange(250) for _ in range(8)), a, a == 16),))
             for a in (0, 8)]
    plans.append(StepPlan((SeqWork(0, tuple(rng.randrange(250) for _ in range(5)), 16, True),
                           SeqWork(2, (7,), 0, True))))
    pos0, pos2, pos1 = 21, 1, 0
    for i in range(12):
        n = 4 + i % 3
        work = [SeqWork(0, (rng.randrange(250),), pos0 + i, True),
                SeqWork(2, (rng.randrange(250),), pos2 + i, True),
                SeqWork(1, tuple(rng.randrange(250) for _ in range(n)), pos1, i % 4 == 3)]
        pos1 += n
        plans.append(StepPlan(tuple(work)))
    return plans


def sampled_rows(plan: StepPlan) -> list[int]:
    rows, end = [], 0
    for w in plan.work:
        end += len(w.token_ids)
        if w.sample:
            rows.append(end - 1)
    return rows


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_padded_static_pass_gives_the_plain_logits_and_cache(backend: str) -> None:
    def ops():  # noqa: ANN202
        if backend == "torch":
            return TorchOps()
        o = TritonOps()  # attention, norms, rope interpreted; the MoE's torch reference here
        o._moe_forward = None
        return o

    plain, padded = make_model(ops()), make_model(ops())
    last = torch.zeros(SLOTS + 1, dtype=torch.long)
    graphs = StepGraphs(padded, SLOTS, 24, last, capture=False)
    assert graphs.buckets == [16, 24]
    for plan in mixed_steps():
        want = plain.forward(build_batch(plan, "cpu"))
        hidden = graphs.run(plan.work)
        assert hidden.shape[0] == sum(len(w.token_ids) for w in plan.work)
        got = padded.unembed(hidden[sampled_rows(plan)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i in range(len(plain.cache.k)):  # the real slots' caches; the dummy slot took padding
        torch.testing.assert_close(padded.cache.k[i][:SLOTS], plain.cache.k[i][:SLOTS])
        torch.testing.assert_close(padded.cache.v[i][:SLOTS], plain.cache.v[i][:SLOTS])


def test_a_step_that_does_not_fit_the_cache_is_refused_with_a_clear_error() -> None:
    model = make_model(TorchOps())
    graphs = StepGraphs(model, SLOTS, 24, torch.zeros(SLOTS + 1, dtype=torch.long),
                        capture=False)
    with pytest.raises(ValueError, match="beyond the cache capacity"):
        graphs.run([SeqWork(0, (1,) * 8, CONTEXT - 4, sample=True)])
    assert not graphs.can_run([SeqWork(0, (1,) * 25, 0, sample=True)])  # too big: eager
    assert not graphs.can_run([])


def engine(step_graphs: bool) -> Engine:
    e = Engine(EngineConfig(device="cpu", dtype="float32", max_slots=SLOTS, max_context=CONTEXT,
                            max_chunk_tokens=CHUNK))
    if step_graphs:
        e.step_graphs = StepGraphs(e.model, e.max_slots, 24, e.last_tokens, capture=False)
    return e


def test_engine_steps_through_the_step_pass_sample_what_eager_steps_sample() -> None:
    """Seeded sampling, logprobs, penalties and rows that read their token on the device
    (PREVIOUS_TOKEN, launched before the previous step was collected)."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, logprobs=True)
    penalized = SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.3, top_logprobs=2)
    results = []
    for use in (False, True):
        e = engine(use)
        got = []
        first = e.launch(StepPlan((SeqWork(0, (5, 6, 7, 8), 0, True, seeded),
                                   SeqWork(1, (9, 10), 0, True, penalized,
                                           prompt_token_ids=(9, 10)))))
        # launched before `first` is collected: slot 0's row reads its token on the device
        second = e.launch(StepPlan((SeqWork(0, (PREVIOUS_TOKEN,), 4, True, seeded),
                                    SeqWork(2, (1, 2, 3), 0, True))))
        got.append(e.collect(first).tokens)
        got.append(e.collect(second).tokens)
        assert e.step_graphs is None or e.step_graphs.replays == 2
        results.append(got)
    eager, padded = ([t for step in r for t in step] for r in results)
    assert [t.token_id for t in padded] == [t.token_id for t in eager]
    assert [t.slot for t in padded] == [t.slot for t in eager] == [0, 1, 0, 2]
    for a, b in zip(padded, eager, strict=True):  # the same to fp32 rounding of a padded batch
        assert (a.logprob is None) == (b.logprob is None)
        if a.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]


def test_the_capture_filler_is_a_valid_step_of_every_bucket_size() -> None:
    model = make_model(TorchOps())
    graphs = StepGraphs(model, SLOTS, 60, torch.zeros(SLOTS + 1, dtype=torch.long),
                        capture=False)
    for b in graphs.buckets:  # chunks ≤ the 23-position ring; staging checks every sequence
        works = graphs._filler(b)
        assert sum(len(w.token_ids) for w in works) == b
        assert graphs._stage(works, b) == b
