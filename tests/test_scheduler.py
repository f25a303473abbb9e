"""Scheduler on plain data against a fake engine: batching, chunking, stops, aborts, prefix reuse."""

from __future__ import annotations

import random

import pytest

from runtime.types import SamplingParams
from scheduler.request import FinishReason, Request, RequestOutput, StopParams
from scheduler.scheduler import DuplicateRequest, QueueFull, Scheduler, SchedulerConfig
from scheduler.stats import NullSink
from tests.service_fakes import EOS, ByteTokenizer, FakeEngine, generate_alone

GREEDY = SamplingParams(temperature=0.0)
TOK = ByteTokenizer()


class RecordingSink(NullSink):
    def __init__(self) -> None:
        self.steps: list = []
        self.done: list = []
        self.gauges: list = []

    def on_step(self, stats) -> None:
        self.steps.append(stats)

    def on_request_done(self, stats) -> None:
        self.done.append(stats)

    def on_gauges(self, stats) -> None:
        self.gauges.append(stats)


def make(engine: FakeEngine | None = None, clock=None, **cfg  # noqa: ANN001
         ) -> tuple[Scheduler, FakeEngine, RecordingSink]:
    engine = engine or FakeEngine()
    config = SchedulerConfig(
        max_slots=engine.max_slots, max_context=engine.max_context,
        max_chunk_tokens=engine.max_chunk_tokens, prefix_reuse_slack=engine.prefix_reuse_slack,
        **cfg,
    )
    sink = RecordingSink()
    kw = {} if clock is None else {"clock": clock}
    return Scheduler(config, decode=TOK.decode, sink=sink, **kw), engine, sink


def req(rid: str, prompt, n: int | None = 8, sampling=GREEDY, **stop) -> Request:
    return Request(rid, tuple(prompt), sampling, StopParams(max_new_tokens=n, **stop))


def run_all(s: Scheduler, engine: FakeEngine, limit: int = 10_000) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(limit):
        if not s.has_work():
            return outs
        for o in s.step(engine):
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("scheduler did not finish")


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_single_request_matches_running_alone_and_reports_usage() -> None:
    s, engine, sink = make()
    s.add(req("a", [1, 2, 3], n=10))
    outs = run_all(s, engine)["a"]
    assert tokens(outs) == generate_alone([1, 2, 3], 10)
    last = outs[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert (last.prompt_tokens, last.completion_tokens) == (3, 10)
    assert all(o.finish_reason is None for o in outs[:-1])
    assert sink.done[0].generation_tokens == 10 and len(sink.steps) == 10
    assert s.slots.num_used == 0 and sink.gauges[-1].slots_used == 0


def test_many_mixed_requests_are_batched_and_each_equals_running_alone() -> None:
    rng = random.Random(0)
    s, engine, sink = make(FakeEngine(max_slots=4, max_chunk_tokens=8), max_step_tokens=20)
    specs = {}
    for i in range(12):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 40))]
        specs[f"r{i}"] = (prompt, rng.randint(1, 12))
        s.add(req(f"r{i}", prompt, n=specs[f"r{i}"][1]))
    outs = run_all(s, engine)
    for rid, (prompt, n) in specs.items():
        assert tokens(outs[rid]) == generate_alone(prompt, n), rid
    assert max(st.batch_size for st in sink.steps) == 4  # all slots were busy at once
    for plan in engine.plans:
        assert plan.num_tokens <= 20
        assert all(len(w.token_ids) <= 8 for w in plan.work)


def test_admission_is_fifo() -> None:
    s, engine, _ = make(FakeEngine(max_slots=1))
    for i in range(3):
        s.add(req(f"r{i}", [i + 1], n=2))
    order = [o.request_id for o in run_all_flat(s, engine) if o.finished]
    assert order == ["r0", "r1", "r2"]


def run_all_flat(s: Scheduler, engine: FakeEngine) -> list[RequestOutput]:
    flat = []
    while s.has_work():
        flat += s.step(engine)
    return flat


def test_long_prompt_is_chunked_without_stalling_running_streams() -> None:
    s, engine, _ = make(FakeEngine(max_slots=2, max_chunk_tokens=16), max_step_tokens=16)
    s.add(req("stream", [7], n=30))
    s.step(engine)  # "stream" is decoding now
    long_prompt = list(range(100))
    s.add(req("long", long_prompt, n=3))
    outs = run_all(s, engine)
    # While "long" was being prefilled, every step still carried the stream's decode token.
    prefill_plans = [p for p in engine.plans if any(len(w.token_ids) > 1 for w in p.work)]
    assert len(prefill_plans) >= 100 // 15
    for plan in prefill_plans:
        assert any(w.slot != plan.work[-1].slot and len(w.token_ids) == 1 for w in plan.work)
    assert tokens(outs["long"]) == generate_alone(long_prompt, 3)
    assert tokens(outs["stream"])[-29:] == generate_alone([7], 30)[-29:]


def test_eos_and_stop_token_ids_and_ignore_eos() -> None:
    prompt = [5, 6]
    expected = generate_alone(prompt, 20)
    eos = expected[3]
    s, engine, _ = make(eos_token_ids=(eos,))
    s.add(req("eos", prompt, n=20))
    s.add(req("ignore", prompt, n=6, ignore_eos=True))
    outs = run_all(s, engine)
    assert tokens(outs["eos"]) == expected[:4]  # the EOS token is included in token ids
    assert outs["eos"][-1].finish_reason is FinishReason.STOP
    assert tokens(outs["ignore"]) == expected[:6]
    assert outs["ignore"][-1].finish_reason is FinishReason.LENGTH

    s, engine, _ = make()
    s.add(req("sid", prompt, n=20, stop_token_ids=(expected[2],)))
    s.add(req("min", [5, 6], n=20, stop_token_ids=(expected[2],), min_new_tokens=5))
    outs = run_all(s, engine)
    assert tokens(outs["sid"]) == expected[:3]
    assert outs["sid"][-1].finish_reason is FinishReason.STOP
    assert len(tokens(outs["min"])) >= 5


def test_stop_string_across_tokens_truncates_text_and_frees_the_slot() -> None:
    prompt = TOK.encode("x")
    out_ids = generate_alone(prompt, 40)
    text = TOK.decode(out_ids)
    # A stop string made of two adjacent whole characters from the middle of the output.
    i = next(i for i in range(5, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    stop = text[i : i + 2]
    s, engine, _ = make()
    s.add(req("s", prompt, n=40, stop=(stop,)))
    outs = run_all(s, engine)["s"]
    assert outs[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert "".join(o.text for o in outs) == text[: text.find(stop)]
    assert s.slots.num_used == 0


def test_length_at_end_of_context_when_max_new_tokens_unset() -> None:
    s, engine, _ = make(FakeEngine(max_context=20))
    s.add(req("ctx", [1, 2, 3, 4, 5], n=None))
    outs = run_all(s, engine)["ctx"]
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].completion_tokens == 15


def test_abort_waiting_and_running_frees_slots_and_others_continue() -> None:
    s, engine, _ = make(FakeEngine(max_slots=1))
    s.add(req("run", [1], n=50))
    s.add(req("wait", [2], n=5))
    s.step(engine)
    s.step(engine)
    assert s.abort("wait") and s.abort("run")
    assert not s.abort("unknown")
    outs = s.step(engine)
    assert {o.request_id: o.finish_reason for o in outs} == {
        "run": FinishReason.ABORTED, "wait": FinishReason.ABORTED}
    assert s.slots.num_used == 0 and not s.has_work()
    s.add(req("after", [3], n=4))
    assert tokens(run_all(s, engine)["after"]) == generate_alone([3], 4)


def test_queue_full_and_duplicate_ids() -> None:
    s, _, _ = make(max_queue=2)
    s.add(req("a", [1]))
    with pytest.raises(DuplicateRequest):
        s.add(req("a", [1]))
    s.add(req("b", [1]))
    with pytest.raises(QueueFull):
        s.add(req("c", [1]))


def test_prefix_reuse_skips_cached_tokens_and_output_is_unchanged() -> None:
    s, engine, sink = make(FakeEngine(max_slots=2, prefix_reuse_slack=4))
    first = list(range(1, 30))
    s.add(req("first", first, n=3))
    first_out = tokens(run_all(s, engine)["first"])
    second = first + first_out[:2] + [99, 98]  # shares 31 tokens with what the slot holds
    s.add(req("second", second, n=5))
    outs = run_all(s, engine)["second"]
    assert outs[-1].cached_tokens == 31
    assert engine.plans[-5].work[0].start_pos == 31  # first step of "second" fed only the rest
    assert tokens(outs) == generate_alone(second, 5)
    assert sum(st.prefix_hit_tokens for st in sink.steps) == 31


def test_no_prefix_reuse_when_the_slot_holds_too_much_beyond_the_prefix() -> None:
    s, engine, _ = make(FakeEngine(max_slots=1, prefix_reuse_slack=2))
    s.add(req("first", [1, 2, 3, 4], n=10))  # the slot then holds 13 tokens
    run_all(s, engine)
    s.add(req("second", [1, 2, 3, 4, 5], n=2))  # shares 4: 13 - 4 > slack
    outs = run_all(s, engine)["second"]
    assert outs[-1].cached_tokens == 0
    assert tokens(outs) == generate_alone([1, 2, 3, 4, 5], 2)


def test_seeds_make_sampled_requests_reproducible_whatever_the_batch() -> None:
    hot = SamplingParams(temperature=1.0, seed=1234)
    alone = generate_alone([4, 2], 8, hot)
    s, engine, _ = make()
    s.add(req("seeded", [4, 2], n=8, sampling=hot))
    for i in range(3):
        s.add(req(f"noise{i}", [i, i], n=6, sampling=SamplingParams(temperature=1.0)))
    assert tokens(run_all(s, engine)["seeded"]) == alone


def test_random_seed_is_assigned_when_the_client_gave_none() -> None:
    s, engine, _ = make()
    r = Request("r", (1,), SamplingParams(temperature=1.0), StopParams(max_new_tokens=1),
                random_seed=True)
    s.add(r)
    run_all(s, engine)
    assert engine.plans[0].work[0].sampling.seed == r.sampling.seed != 0


def test_penalty_context_is_sent_only_when_penalties_are_on() -> None:
    s, engine, _ = make()
    s.add(req("pen", [1, 2], n=3, sampling=SamplingParams(temperature=0.0, presence_penalty=0.5)))
    s.add(req("plain", [3, 4], n=3))
    run_all(s, engine)
    last = engine.plans[-1].work
    pen = next(w for w in last if w.prompt_token_ids)
    assert pen.prompt_token_ids == (1, 2) and len(pen.output_token_ids) == 2
    assert sum(1 for w in last if w.prompt_token_ids) == 1


def test_engine_failure_fails_the_step_requests_and_frees_their_slots() -> None:
    s, engine, _ = make()
    s.add(req("a", [1], n=5))
    s.step(engine)
    engine.fail_next = True
    outs = s.step(engine)
    assert outs[0].finish_reason is FinishReason.ERROR and "injected" in (outs[0].error or "")
    assert s.slots.num_used == 0 and not s.has_work()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_under_load_new_prompts_are_batched_into_fewer_prefill_steps() -> None:
    """With ≥ 2 streams decoding, a new prompt waits for company (8 prompt tokens) or 0.5 s; a
    lone arrival at low load is admitted at once. Outputs are unchanged."""
    clock = Clock()
    s, engine, _ = make(FakeEngine(max_slots=8, max_context=256, max_chunk_tokens=32), clock,
                        prefill_batch_tokens=8, prefill_max_wait_s=0.5,
                        prefill_batch_min_running=2)
    outs: dict[str, list[RequestOutput]] = {}

    def step() -> list[int]:
        for o in s.step(engine):
            outs.setdefault(o.request_id, []).append(o)
        return [len(w.token_ids) for w in engine.plans[-1].work]

    s.add(req("a", b"aaa", n=40))
    assert step() == [3]  # nobody decoding: admitted at once
    s.add(req("b", b"bbb", n=40))
    assert step() == [1, 3]  # one decoding (below the threshold of 2): at once
    s.add(req("c", b"ccc", n=3))
    assert step() == [1, 1]  # two decoding: c's 3 prompt tokens wait for company
    s.add(req("d", b"ddddd", n=3))
    assert step() == [1, 1, 3, 5]  # 8 prompt tokens waiting: both in one step
    s.add(req("e", b"e", n=3))
    assert step() == [1, 1, 1, 1]  # e waits…
    clock.now += 0.5
    assert step()[-1] == 1 and engine.plans[-1].work[-1].token_ids == tuple(b"e")  # …≤ 0.5 s
    for o in run_all(s, engine).items():
        outs.setdefault(o[0], []).extend(o[1])
    for rid, prompt in (("c", b"ccc"), ("d", b"ddddd"), ("e", b"e")):
        assert tokens(outs[rid]) == generate_alone(list(prompt), 3)


def test_held_back_prompts_ride_along_with_a_chunk_and_never_leave_an_empty_step() -> None:
    s, engine, _ = make(FakeEngine(max_slots=8, max_context=256, max_chunk_tokens=4), Clock(),
                        prefill_batch_tokens=10, prefill_max_wait_s=5.0,
                        prefill_batch_min_running=0)
    s.add(req("a", b"aa", n=3))
    s.step(engine)  # nothing decoding: admitted at once, even with min_running 0
    assert [len(w.token_ids) for w in engine.plans[-1].work] == [2]
    s.add(req("b", b"bbbbbbbbbb", n=3))  # 10 tokens (the threshold): fed in chunks of 4
    s.step(engine)
    assert [len(w.token_ids) for w in engine.plans[-1].work] == [1, 4]
    s.add(req("c", b"cc", n=3))  # below the threshold, but b's chunk makes the step eager
    s.step(engine)
    assert [len(w.token_ids) for w in engine.plans[-1].work] == [1, 4, 2]


def test_step_stats_carry_the_host_time_outside_the_engine() -> None:
    from tests.service_fakes import Throttled

    engine = FakeEngine()
    s, _, sink = make(engine)
    s.add(req("a", b"abc", n=3))
    slow = Throttled(engine, delay_s=0.05)  # 50 ms of "GPU" per step
    while s.has_work():
        s.step(slow)
    assert sink.steps and all(0 < st.scheduler_s < 0.05 for st in sink.steps)


def test_prefill_batching_can_be_turned_off() -> None:
    engine = FakeEngine(max_slots=4)
    s, engine, _ = make(engine, prefill_batch_tokens=0, prefill_batch_min_running=0)
    s.add(req("a", b"aaa", n=20))
    s.step(engine)
    s.add(req("b", b"b", n=20))
    s.step(engine)
    assert [len(w.token_ids) for w in engine.plans[-1].work] == [1, 1]  # b admitted at once


def test_config_rejects_a_budget_smaller_than_the_decode_batch() -> None:
    with pytest.raises(ValueError, match="max_step_tokens"):
        SchedulerConfig(max_slots=8, max_context=64, max_step_tokens=4)


def test_eos_constant_is_outside_the_byte_range() -> None:
    assert TOK.decode([EOS]) == ""


@pytest.mark.parametrize("start,end", [(0, 3), (1, 5), (3, 6), (4, 5), (2, 2), (0, 6)])
def test_request_tokens_span_prompt_and_output(start: int, end: int) -> None:
    r = req("r", [10, 11, 12, 13])
    r.output_ids.extend([20, 21])
    assert r.tokens(start, end) == (10, 11, 12, 13, 20, 21)[start:end]


def test_the_scheduler_never_imports_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, scheduler; assert 'torch' not in sys.modules, 'torch was imported'"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
