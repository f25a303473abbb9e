"""Overlapped scheduling: step n+1 is planned and launched before step n's tokens are read.

A user sees the same tokens as without it (and as each request run alone); the only difference is
inside: a request stopped by step n's token computed one dropped row in step n+1.
"""

from __future__ import annotations

import random

from runtime.types import PREVIOUS_TOKEN, SamplingParams
from scheduler.request import FinishReason, Request, StopParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from tests.service_fakes import EOS, ByteTokenizer, FakeEngine, generate_alone

GREEDY = SamplingParams(temperature=0.0)
TOK = ByteTokenizer()


def make(engine: FakeEngine, overlap: bool = True, **cfg) -> Scheduler:  # noqa: ANN003
    config = SchedulerConfig(
        max_slots=engine.max_slots, max_context=engine.max_context,
        max_chunk_tokens=engine.max_chunk_tokens, prefix_reuse_slack=engine.prefix_reuse_slack,
        eos_token_ids=(EOS,), overlap=overlap, prefill_batch_tokens=0, **cfg,
    )
    return Scheduler(config, decode=TOK.decode)


def run_all(s: Scheduler, engine: FakeEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(10_000):
        if not s.has_work():
            return outs
        for o in s.step(engine):
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("scheduler did not finish")


def tokens_of(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def placeholder_rows(engine: FakeEngine) -> int:
    return sum(w.token_ids == (PREVIOUS_TOKEN,) for p in engine.plans for w in p.work)


def random_requests(rng: random.Random, n: int) -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = tuple(rng.randrange(256) for _ in range(rng.randint(1, 70)))
        sampling = GREEDY if i % 2 else SamplingParams(temperature=1.0, seed=i)
        reqs.append(Request(f"r{i}", prompt, sampling,
                            StopParams(max_new_tokens=rng.randint(1, 40))))
    return reqs


def test_overlapped_tokens_equal_sequential_and_alone() -> None:
    results = {}
    for overlap in (False, True):
        engine = FakeEngine(max_slots=4, max_context=256, max_chunk_tokens=16)
        s = make(engine, overlap=overlap)
        for r in random_requests(random.Random(7), 24):
            s.add(r)
        results[overlap] = {rid: tokens_of(o) for rid, o in run_all(s, engine).items()}
        assert engine.in_flight == 0 and s.slots.num_used == 0
    assert results[True] == results[False]
    for r in random_requests(random.Random(7), 24):  # and each equals the request run alone
        want = generate_alone(r.prompt_ids, r.stop.max_new_tokens, r.sampling, stop_ids=(EOS,))
        assert results[True][r.request_id] == want


def test_decode_rows_read_the_token_in_flight_from_the_engine() -> None:
    engine = FakeEngine()
    s = make(engine)
    s.add(Request("a", tuple(b"hello"), GREEDY, StopParams(max_new_tokens=6)))
    outs = run_all(s, engine)
    assert tokens_of(outs["a"]) == generate_alone(b"hello", 6, stop_ids=(EOS,))
    # every decode row after the prompt's was launched before its token reached the host
    assert placeholder_rows(engine) == 5


def test_a_stop_token_costs_one_dropped_row_and_the_slot_keeps_true_contents() -> None:
    engine = FakeEngine(script=[65, 66, 67])  # "ABC" then EOS
    s = make(engine)
    s.add(Request("a", tuple(b"xyz"), GREEDY, StopParams(max_new_tokens=20)))
    outs = run_all(s, engine)
    assert tokens_of(outs["a"]) == [65, 66, 67, EOS]
    assert outs["a"][-1].finish_reason is FinishReason.STOP
    # prompt + "ABC" + EOS were fed: the last (EOS) by the row launched before EOS was seen
    slot = 0
    assert engine.rows[slot] == list(b"xyz") + [65, 66, 67, EOS]
    assert list(s.slots.cached_tokens(slot)) == engine.rows[slot]
    assert engine.steps == 1 + 4  # prompt, 3 decodes, the dropped row


def test_requests_ending_by_length_get_no_extra_row() -> None:
    engine = FakeEngine()
    s = make(engine)
    s.add(Request("a", tuple(b"abc"), GREEDY, StopParams(max_new_tokens=4)))
    run_all(s, engine)
    assert engine.steps == 4  # prompt + 3 decode rows: the 4th token ends it
    assert engine.rows[0][:3] == list(b"abc") and len(engine.rows[0]) == 3 + 3


def test_context_limit_ends_without_an_extra_row() -> None:
    engine = FakeEngine(max_context=12)
    s = make(engine)
    s.add(Request("a", tuple(b"abcdefgh"), GREEDY, StopParams(ignore_eos=True)))
    outs = run_all(s, engine)
    assert outs["a"][-1].finish_reason is FinishReason.LENGTH
    assert len(tokens_of(outs["a"])) == 4  # 8 + 4 = the context
    assert all(w.end_pos <= 12 for p in engine.plans for w in p.work)


def test_prefix_reuse_after_an_overlapped_stop_is_exact() -> None:
    engine = FakeEngine(max_slots=1, script=[70, 71])
    s = make(engine)
    s.add(Request("a", tuple(b"question"), GREEDY, StopParams(max_new_tokens=10)))
    first = tokens_of(run_all(s, engine)["a"])
    assert first == [70, 71, EOS]
    follow = tuple(b"question") + tuple(first) + tuple(b"more")
    engine.script = None  # answers now depend on the whole row: a wrong cache shows
    s.add(Request("b", follow, GREEDY, StopParams(max_new_tokens=5)))
    outs = run_all(s, engine)
    assert outs["b"][-1].cached_tokens == len(b"question") + 3  # EOS included
    assert tokens_of(outs["b"]) == generate_alone(follow, 5, stop_ids=(EOS,))


def test_penalties_wait_for_the_token_on_the_host() -> None:
    engine = FakeEngine()
    s = make(engine)
    pen = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    s.add(Request("p", tuple(b"abc"), pen, StopParams(max_new_tokens=5)))
    s.add(Request("g", tuple(b"def"), GREEDY, StopParams(max_new_tokens=5)))
    outs = run_all(s, engine)
    assert len(tokens_of(outs["p"])) == 5 and len(tokens_of(outs["g"])) == 5
    assert placeholder_rows(engine) == 0
    # …and every penalty row carried the outputs sampled so far
    rows = [w for p in engine.plans for w in p.work if w.sampling is pen and w.start_pos >= 3]
    assert [len(w.output_token_ids) for w in rows] == [1, 2, 3, 4]


def test_abort_while_a_step_is_in_flight_frees_the_slot_with_true_contents() -> None:
    engine = FakeEngine()
    s = make(engine)
    s.add(Request("a", tuple(b"abc"), GREEDY, StopParams(max_new_tokens=50, ignore_eos=True)))
    for _ in range(4):
        s.step(engine)
    assert s.abort("a")
    outs = run_all(s, engine)
    assert outs["a"][-1].finish_reason is FinishReason.ABORTED
    assert s.slots.num_used == 0 and engine.in_flight == 0
    assert list(s.slots.cached_tokens(0)) == engine.rows[0]


def test_a_failed_launch_fails_its_requests_and_the_rest_go_on() -> None:
    engine = FakeEngine(max_slots=2)
    s = make(engine)
    s.add(Request("a", tuple(b"abc"), GREEDY, StopParams(max_new_tokens=30, ignore_eos=True)))
    s.step(engine)
    s.step(engine)
    engine.fail_next = True
    outs: dict[str, list] = {}
    for o in s.step(engine):  # the launch fails while the step before is in flight
        outs.setdefault(o.request_id, []).append(o)
    s.add(Request("b", tuple(b"xy"), GREEDY, StopParams(max_new_tokens=3)))
    for rid, more in run_all(s, engine).items():
        outs.setdefault(rid, []).extend(more)
    assert outs["a"][-1].finish_reason is FinishReason.ERROR
    assert outs["a"][-1].error and "injected engine failure" in outs["a"][-1].error
    # b arrived after the failure and is served; nothing is left behind
    assert tokens_of(outs["b"]) == generate_alone(b"xy", 3, stop_ids=(EOS,))
    assert s.slots.num_used == 0 and not s.has_work()
