"""GPU end to end (`pytest -m gpu` on an H100): Triton path vs torch path, graphs vs eager, 20b."""

from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig, preset
from runtime.engine import Engine, EngineConfig
from runtime.types import GREEDY, SamplingParams, SeqWork, StepPlan

pytestmark = pytest.mark.gpu  # deselected in the CPU suite (pyproject addopts: -m 'not gpu')


def engine(kernels: str, graphs: bool, **kw) -> Engine:
    cfg = dict(device="cuda", dtype="bfloat16", max_slots=8, max_context=1024,
               max_chunk_tokens=256, kernels=kernels, cuda_graphs=graphs)
    cfg.update(kw)
    e = Engine(EngineConfig(**cfg))
    e.warmup()
    return e


PROMPTS = [[3 + i % 250 for i in range(n)] for n in (1, 17, 100, 300)]  # ids < tiny vocab 259


def teacher_forced_logits(e: Engine, ids: list[int], n_prompt: int, slot: int) -> torch.Tensor:
    """Logits [len(ids) - n_prompt + 1, V] predicting each token after the prompt."""
    from runtime.batch import build_batch

    rows = []
    pos = 0
    while pos < len(ids):
        n = n_prompt - pos if pos < n_prompt else 1
        n = min(n, e.max_chunk_tokens)
        work = SeqWork(slot, tuple(ids[pos : pos + n]), pos, sample=True)
        row = e.model.forward(build_batch(StepPlan((work,)), "cuda"))[0]
        pos += n
        if pos >= n_prompt:
            rows.append(row)
    return torch.stack(rows)


def test_triton_path_greedy_tokens_equal_the_torch_path() -> None:
    """bf16: each op agrees with its reference to bf16 rounding (bench/diag_ops), but a rounding
    difference can flip a near-tied router top-k of the random model and move that row's logits a
    lot; so most rows must agree to bf16 tolerance and most clear greedy choices must match.
    The strict equality check is the float32 test below."""
    torch_engine = engine("torch", graphs=False)
    triton_engine = engine("triton", graphs=False)
    for slot, p in enumerate(PROMPTS):
        greedy = torch_engine.generate(p, GREEDY, max_new_tokens=40, ignore_eos=True, slot=slot)
        ids = p + list(greedy.token_ids)
        ref = teacher_forced_logits(torch_engine, ids, len(p), slot)[:-1]  # [40, V]
        got = teacher_forced_logits(triton_engine, ids, len(p), slot)[:-1]
        scale = ref.abs().amax(dim=-1)
        row_err = (got - ref).abs().amax(dim=-1) / scale
        assert row_err.median().item() < 3e-2, f"prompt {len(p)}: row errors {row_err.tolist()}"
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 3e-2 * scale
        agree = (got.argmax(-1)[clear] == ref.argmax(-1)[clear]).float().mean().item()
        assert agree >= 0.9, f"prompt {len(p)}: only {agree:.0%} of clear greedy choices agree"


def test_triton_path_equals_the_torch_path_in_float32() -> None:
    """fp32 removes bf16 rounding: any disagreement beyond ~1e-4 is a kernel bug (and a 300-token
    prefill exercises the prefill MoE tiles, which must fit shared memory with fp32 activations)."""
    torch_engine = engine("torch", graphs=False, dtype="float32")
    triton_engine = engine("triton", graphs=False, dtype="float32")
    for slot, p in enumerate(PROMPTS):
        ids = p + [7, 100, 3, 250, 17, 42]
        ref = teacher_forced_logits(torch_engine, ids, len(p), slot)
        got = teacher_forced_logits(triton_engine, ids, len(p), slot)
        err = ((got - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1)).max().item()
        assert err < 1e-3, f"prompt {len(p)}: fp32 logits differ by {err:.3g} relative"


def assert_decode_graphs_replay_as_eager(eager: Engine, graphed: Engine) -> None:
    """For every decode graph bucket n: n slots prefilled eagerly in both engines, then one
    sampled decode step of n rows; the graphed engine replays its graph (padding rows on the
    dummy slot) and samples the eager engine's tokens. graphed is built with step_graphs=False:
    a step graph would pad the prompts (other MoE tiles, other bf16 roundings)."""
    assert graphed.graphs is not None and graphed.graphs.graphs
    for bucket in graphed.graphs.buckets:
        n = bucket
        sps = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + s) for s in range(n)]
        results = []
        for e in (eager, graphed):
            for s in range(n):  # the same prompt prefix in every slot, different lengths
                e.generate(PROMPTS[2][: 10 + s], GREEDY, max_new_tokens=1, slot=s)
            works = tuple(
                SeqWork(s, (7,), 10 + s, sample=True, sampling=sps[s]) for s in range(n)
            )
            res = e.step(StepPlan(works))
            results.append([t.token_id for t in res.tokens])
            assert res.cuda_graph == (e is graphed)
        assert results[0] == results[1], f"bucket {bucket}: graph replay differs from eager"


def test_graph_replay_equals_eager_for_every_bucket() -> None:
    eager = engine("triton", graphs=False)
    assert_decode_graphs_replay_as_eager(eager, engine("triton", graphs=True, step_graphs=False))


def mixed_step(rng, tokens: int, max_slots: int, chunk: int) -> list[SeqWork]:  # noqa: ANN001
    """Decode rows on some slots, then prompt chunks on others, `tokens` in all."""
    slots = rng.sample(range(max_slots), max_slots)
    n_dec = min(rng.randrange(0, max_slots // 2), tokens - 1)
    work = [SeqWork(s, (rng.randrange(250),), rng.randrange(1, 700), sample=True)
            for s in slots[:n_dec]]
    left = tokens - n_dec
    for s in slots[n_dec:]:
        n = min(left, chunk)
        if n <= 0:
            break
        work.append(SeqWork(s, tuple(rng.randrange(250) for _ in range(n)),
                            rng.randrange(0, 1024 - n), sample=rng.random() < 0.7))
        left -= n
    work[-1] = SeqWork(work[-1].slot, work[-1].token_ids, work[-1].start_pos, sample=True)
    return work


def test_step_graph_replay_equals_its_eager_pass_for_every_bucket() -> None:
    import random

    e = engine("triton", graphs=True)  # prompt-carrying steps of up to 256 tokens as graphs
    sg = e.step_graphs
    assert sg is not None and sorted(sg.graphs) == sg.buckets and sg.max_tokens == 256
    rng = random.Random(0)
    for b in sg.buckets:
        works = mixed_step(rng, b - rng.randrange(0, min(b, 16)), e.max_slots, 200)
        got = sg.run(works).clone()  # replay
        sg.use_graphs = False
        try:
            want = sg.run(works).clone()  # the same padded pass, eagerly
        finally:
            sg.use_graphs = True
        assert torch.equal(got, want), f"bucket {b}: step graph replay differs from eager"


def test_step_graphs_give_the_eager_logits_in_float32() -> None:
    import random

    from runtime.batch import build_batch

    e = engine("triton", graphs=True, dtype="float32")
    assert e.step_graphs is not None and e.step_graphs.graphs
    rng = random.Random(1)
    for tokens in (3, 40, 129, 256):
        plan = StepPlan(tuple(mixed_step(rng, tokens, e.max_slots, 200)))
        batch = build_batch(plan, "cuda")
        want = e.model.forward(batch)  # eager, then the graph on the same cache contents
        got = e.model.unembed(e.step_graphs.run(plan.work)[batch.logits_rows])
        err = ((got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)).max().item()
        assert err < 1e-3, f"{tokens} tokens: step graph logits differ by {err:.3g} relative"
        res = e.step(plan)
        assert res.cuda_graph and len(res.tokens) == sum(w.sample for w in plan.work)


def test_overlapped_launches_equal_explicit_steps_on_graphs_and_eager() -> None:
    """PREVIOUS_TOKEN rows (decode graphs, and eager steps) read the token the slot's previous
    step sampled on the device, before the host has read it."""
    from tests.test_engine_batching import overlapped_and_explicit

    for graphs in (True, False):
        e = engine("triton", graphs=graphs, dtype="float32")
        overlapped, explicit = overlapped_and_explicit(e)
        assert overlapped == explicit, f"graphs={graphs}"
        if graphs:
            assert e.graphs is not None and e.graphs.replays > 0
            assert e.step_graphs is not None and e.step_graphs.replays > 0


def test_random_gpt_oss_20b_generates_through_the_whole_gpu_path() -> None:
    from runtime import synthetic

    cfg: ModelConfig = preset("20b")
    weights = synthetic.random_weights(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    big = Engine(EngineConfig(
        device="cuda", dtype="bfloat16", max_slots=4, max_context=4096, max_chunk_tokens=1024,
    ), weights=weights)
    big.warmup()
    assert big.model.ops.name == "triton" and big.graphs is not None
    out = big.generate(list(range(1000, 1500)), SamplingParams(temperature=1.0, seed=3),
                       max_new_tokens=64, ignore_eos=True)
    assert len(out.token_ids) == 64 and out.finish_reason == "length"
    assert len(set(out.token_ids)) > 8, "random 20b should not emit a near-constant stream"


def test_no_kernel_compiles_while_serving_after_warm_up() -> None:
    """A compile in the middle of serving is seconds of someone's TTFT (seen on the H100 before
    the batch-size arguments were unspecialized: 0.5–2.4 s steps at new token counts)."""
    import random

    from kernels.jit import compiled_variants
    from runtime import synthetic

    cfg: ModelConfig = preset("20b").with_(num_hidden_layers=2)
    weights = synthetic.random_weights(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    e = Engine(EngineConfig(device="cuda", dtype="bfloat16", max_slots=32, max_context=1024,
                            max_chunk_tokens=128), weights=weights)
    e.warmup(256)
    before = compiled_variants()
    rng = random.Random(1)
    for _ in range(40):  # scheduler-like steps: decodes first, then chunks, ≤ 256 tokens
        slots = rng.sample(range(32), 32)
        n_dec = rng.randrange(0, 32)
        work = [SeqWork(s, (rng.randrange(1000),), rng.randrange(0, 900), sample=True)
                for s in slots[:n_dec]]
        budget = 256 - n_dec
        for s in slots[n_dec:]:
            n = min(budget, rng.randrange(1, 129))
            if n <= 0:
                break
            work.append(SeqWork(s, tuple(rng.randrange(1000) for _ in range(n)),
                                rng.randrange(0, 1024 - n), sample=True))
            budget -= n
        e.step(StepPlan(tuple(work)))
    after = compiled_variants()
    new = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert not new, f"kernels compiled after warm-up: {new}"
