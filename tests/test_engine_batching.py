"""Batching must not change results: packed prefill and batched decode equal each sequence alone."""

from __future__ import annotations

import pytest
import torch

from runtime.batch import build_batch
from runtime.engine import Engine, EngineConfig
from runtime.types import GREEDY, SamplingParams, SeqWork, StepPlan


@pytest.fixture(scope="module")
def engine() -> Engine:
    # the built-in tiny model (window 16) with short chunks so prompts span several chunks
    return Engine(EngineConfig(dtype="float32", max_slots=4, max_context=256, max_chunk_tokens=7))


def logits_of(engine: Engine, works: list[SeqWork]) -> torch.Tensor:
    return engine.model.forward(build_batch(StepPlan(tuple(works)), "cpu"))


def prefill(engine: Engine, slot: int, ids: list[int], packed_with: list[SeqWork] = ()) -> torch.Tensor:
    """Feeds ids in chunks; returns the last logits row."""
    pos, row = 0, None
    while pos < len(ids):
        chunk = tuple(ids[pos : pos + engine.max_chunk_tokens])
        row = logits_of(engine, [SeqWork(slot, chunk, pos, sample=True)])[0]
        pos += len(chunk)
    return row


PROMPTS = [list(range(10, 10 + n)) for n in (5, 19, 33)] + [[7] * 3]


def test_packed_prefill_equals_each_prompt_alone(engine: Engine) -> None:
    alone = [prefill(engine, 0, p) for p in PROMPTS[:3]]
    # one step per round feeding every prompt's next chunk together, in slots 1..3
    pos = [0, 0, 0]
    last: dict[int, torch.Tensor] = {}
    while any(pos[i] < len(PROMPTS[i]) for i in range(3)):
        works = []
        for i in range(3):
            if pos[i] < len(PROMPTS[i]):
                chunk = tuple(PROMPTS[i][pos[i] : pos[i] + engine.max_chunk_tokens])
                works.append(SeqWork(i + 1, chunk, pos[i], sample=True))
                pos[i] += len(chunk)
        rows = logits_of(engine, works)
        for w, row in zip(works, rows, strict=True):
            last[w.slot - 1] = row
    for i in range(3):
        torch.testing.assert_close(last[i], alone[i], rtol=1e-5, atol=1e-5)


def test_batched_decode_at_different_positions_equals_each_alone(engine: Engine) -> None:
    # Alone: slot 0, one sequence at a time; greedy-decode 40 steps (past 2 windows of 16).
    steps = 40
    alone: list[list[int]] = []
    for p in PROMPTS:
        toks = [int(prefill(engine, 0, p).argmax())]
        for k in range(steps - 1):
            row = logits_of(engine, [SeqWork(0, (toks[-1],), len(p) + k, sample=True)])[0]
            toks.append(int(row.argmax()))
        alone.append(toks)
    # Together: four slots at different positions, decoded in one batch each step.
    toks = [[int(prefill(engine, s, p).argmax())] for s, p in enumerate(PROMPTS)]
    for k in range(steps - 1):
        works = [SeqWork(s, (toks[s][-1],), len(p) + k, sample=True) for s, p in enumerate(PROMPTS)]
        rows = logits_of(engine, works)
        for s in range(len(PROMPTS)):
            toks[s].append(int(rows[s].argmax()))
    assert toks == alone


def test_mixed_step_of_prefill_chunk_and_decodes_equals_alone(engine: Engine) -> None:
    first = int(prefill(engine, 1, PROMPTS[0]).argmax())
    expected_decode = logits_of(engine, [SeqWork(1, (first,), len(PROMPTS[0]), sample=True)])[0]
    expected_prefill = prefill(engine, 0, PROMPTS[1][:7])
    # redo slot 1's prompt, then run its decode packed with slot 2's prefill chunk
    prefill(engine, 1, PROMPTS[0])
    rows = logits_of(engine, [
        SeqWork(1, (first,), len(PROMPTS[0]), sample=True),
        SeqWork(2, tuple(PROMPTS[1][:7]), 0, sample=True),
    ])
    torch.testing.assert_close(rows[0], expected_decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1], expected_prefill, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_independent_of_batch_companions(engine: Engine) -> None:
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = engine.generate(PROMPTS[1], sp, max_new_tokens=20, ignore_eos=True, slot=2)
    # Same request decoded step by step beside an unrelated sampled request in slot 0.
    other = SamplingParams(temperature=1.3, seed=99)
    prefill(engine, 0, PROMPTS[0])
    p0, p2 = len(PROMPTS[0]), len(PROMPTS[1])
    pos = 0
    feed = PROMPTS[1]
    while pos < p2:  # prompt of slot 2 in chunks; last chunk samples
        chunk = tuple(feed[pos : pos + engine.max_chunk_tokens])
        last = pos + len(chunk) == p2
        res = engine.step(StepPlan((SeqWork(2, chunk, pos, sample=last, sampling=sp),)))
        pos += len(chunk)
    toks = [res.tokens[0].token_id]
    t0 = 5
    for k in range(19):
        res = engine.step(StepPlan((
            SeqWork(0, (t0,), p0 + k, sample=True, sampling=other),
            SeqWork(2, (toks[-1],), p2 + k, sample=True, sampling=sp),
        )))
        t0 = res.tokens[0].token_id
        toks.append(res.tokens[1].token_id)
    assert tuple(toks) == alone.token_ids


def test_greedy_generate_is_deterministic_and_stops_at_eos(engine: Engine) -> None:
    a = engine.generate(PROMPTS[2], GREEDY, max_new_tokens=12)
    b = engine.generate(PROMPTS[2], GREEDY, max_new_tokens=12, slot=3)
    assert a == b
    eos = a.token_ids[3]
    c = engine.generate(PROMPTS[2], GREEDY, max_new_tokens=12, stop_token_ids=(eos,))
    assert c.finish_reason == "stop" and c.token_ids == a.token_ids[: a.token_ids.index(eos) + 1]


@pytest.mark.parametrize(
    ("work", "message"),
    [
        (SeqWork(9, (1,), 0, sample=True), "slot 9 outside"),
        (SeqWork(0, (), 0, sample=True), "empty token chunk"),
        (SeqWork(0, (1,) * 8, 0, sample=True), "exceeds max_chunk_tokens"),
        (SeqWork(0, (1,), 256, sample=True), "exceed the context"),
        (SeqWork(0, (100000,), 0, sample=True), "outside the vocab"),
    ],
)
def test_bad_plans_are_refused_with_a_clear_message(engine: Engine, work: SeqWork, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.step(StepPlan((work,)))


def overlapped_and_explicit(engine: Engine) -> tuple[dict, dict]:
    """The tokens of two seeded requests over 5 steps, fed explicitly step by step, and with each
    decode step launched (PREVIOUS_TOKEN rows) before the previous step's tokens are read."""
    from runtime.types import PREVIOUS_TOKEN

    sampling = SamplingParams(temperature=1.0, seed=11)
    prompts = {0: [3, 1, 4, 1, 5], 2: [9, 2, 6]}

    explicit = {}
    for slot, p in prompts.items():
        r = engine.step(StepPlan((SeqWork(slot, tuple(p), 0, True, sampling),)))
        toks = [r.tokens[0].token_id]
        for i in range(4):
            w = SeqWork(slot, (toks[-1],), len(p) + i, True, sampling)
            toks.append(engine.step(StepPlan((w,))).tokens[0].token_id)
        explicit[slot] = toks

    first = StepPlan(tuple(SeqWork(s, tuple(p), 0, True, sampling) for s, p in prompts.items()))
    in_flight = engine.launch(first)
    overlapped: dict[int, list[int]] = {s: [] for s in prompts}
    for i in range(4):
        nxt = StepPlan(tuple(SeqWork(s, (PREVIOUS_TOKEN,), len(p) + i, True, sampling)
                             for s, p in prompts.items()))
        launched = engine.launch(nxt)  # before the previous step's tokens are read
        for t in engine.collect(in_flight).tokens:
            overlapped[t.slot].append(t.token_id)
        in_flight = launched
    for t in engine.collect(in_flight).tokens:
        overlapped[t.slot].append(t.token_id)
    return overlapped, explicit


def test_a_decode_row_launched_before_its_token_is_read_equals_the_explicit_token(
        engine: Engine) -> None:
    """Overlapped scheduling: step n+1 is launched with PREVIOUS_TOKEN rows before step n's
    tokens reach the host; the tokens equal those of steps fed the explicit ids."""
    overlapped, explicit = overlapped_and_explicit(engine)
    assert overlapped == explicit


def test_previous_token_is_only_valid_as_a_whole_decode_row(engine: Engine) -> None:
    from runtime.types import PREVIOUS_TOKEN

    with pytest.raises(ValueError, match="outside the vocab"):
        engine.step(StepPlan((SeqWork(0, (5, PREVIOUS_TOKEN), 0, True),)))
