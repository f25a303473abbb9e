"""TritonOps (interpreted on CPU tensors) runs the tiny model to the same logits as TorchOps.

fp32 so that differences are the kernels' own; prefill chunks, mixed prefill + decode steps and
decode steps that cross the sliding window and wrap its ring buffer. The MoE block uses the torch
reference here (its kernels have their own tests), keeping this test about attention/norm/rope.
"""

from __future__ import annotations

import pytest
import torch

from runtime.batch import build_batch
from runtime.config import preset
from runtime.kv_cache import CacheShape, KVCache
from runtime.model import Model
from runtime.ops import TorchOps
from runtime.ops_triton import TritonOps
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan


def make_model(ops) -> Model:  # noqa: ANN001
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=3, device="cpu", dtype=torch.float32)
    shape = CacheShape(max_slots=3, max_context=64, max_chunk_tokens=8)  # sliding ring: 16+8-1
    return Model(weights, KVCache(cfg, shape, "cpu", torch.float32), 64, ops=ops)


def steps() -> list[StepPlan]:
    """slot 0: a 21-token prompt in chunks of 8, then decode to position 40 (past the window of
    16 and around the 23-position ring); slot 2 joins mid-way with a 5-token prompt."""
    prompt0 = [(7 * i + 3) % 250 for i in range(21)]
    plans = [StepPlan((SeqWork(0, tuple(prompt0[a : a + 8]), a, sample=a + 8 >= 21),))
             for a in range(0, 21, 8)]
    pos0 = 21
    prompt2 = (5, 9, 200, 13, 1)
    plans.append(StepPlan((SeqWork(0, (11,), pos0, sample=True),
                           SeqWork(2, prompt2, 0, sample=True))))  # mixed: decode + prefill
    pos0 += 1
    for i in range(19):
        work = [SeqWork(0, ((i * 13) % 250,), pos0 + i, sample=True),
                SeqWork(2, ((i * 5) % 250,), 5 + i, sample=True)]
        if i < 5:  # slot 1's prompt in chunks of 4 behind the two decodes (split attention)
            work.append(SeqWork(1, tuple((3 * j + i) % 250 for j in range(4)), 4 * i,
                                sample=i == 4))
        elif i == 5:  # a one-token chunk that is not a leading decode
            work.append(SeqWork(1, (17,), 20, sample=True))
        plans.append(StepPlan(tuple(work)))
    return plans


@pytest.mark.parametrize("dense_gemv_rows", [0, 8])  # qkv/out by cuBLAS, or ≤ 8 rows by Triton
def test_triton_ops_give_the_torch_logits(dense_gemv_rows: int) -> None:
    ops = TritonOps(dense_gemv_rows)
    ops._moe_forward = None  # the torch reference MoE
    torch_model, triton_model = make_model(TorchOps()), make_model(ops)
    for plan in steps():
        want = torch_model.forward(build_batch(plan, "cpu"))
        got = triton_model.forward(build_batch(plan, "cpu"))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for layer in range(len(torch_model.cache.k)):  # the same cache contents, ring slots included
        for got, want in ((triton_model.cache.k, torch_model.cache.k),
                          (triton_model.cache.v, torch_model.cache.v)):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-4)


def test_triton_ops_refuse_a_chunk_longer_than_the_ring() -> None:
    model = make_model(TritonOps())
    plan = StepPlan((SeqWork(0, tuple(range(30)), 0, sample=True),))  # ring holds 23
    with pytest.raises(ValueError, match="capacity"):
        model.forward(build_batch(plan, "cpu"))


def test_dense_gemv_rows_outside_its_range_are_refused() -> None:
    with pytest.raises(ValueError, match="dense_gemv_rows"):
        TritonOps(9)


def test_decode_attention_variant_follows_the_measured_batch_sizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kernels.decode_latency import FULL, WINDOW
    from kernels.decode_variants import SERVING, SERVING_MAX_ROWS
    from runtime.ops_switches import ATTN_FULL, ATTN_WINDOW

    monkeypatch.delenv("GPTOSS_ATTN_WINDOW", raising=False)
    monkeypatch.delenv("GPTOSS_ATTN_FULL", raising=False)
    ops = TritonOps()
    # the configs timed fastest per layer kind (H100, run 53)
    for window, chosen in ((0, FULL[ATTN_FULL]), (128, WINDOW[ATTN_WINDOW])):
        assert ops._decode_variant(1, window) is chosen
        assert ops._decode_variant(SERVING_MAX_ROWS, window) is chosen
        assert ops._decode_variant(SERVING_MAX_ROWS + 1, window) is None  # two launches
    monkeypatch.setenv("GPTOSS_ATTN_WINDOW", "serving")  # the former config, by name
    assert TritonOps()._decode_variant(1, 128) is SERVING
    # a candidate per layer kind, by name (bench.attn_decode's)
    monkeypatch.setenv("GPTOSS_ATTN_WINDOW", "win_sink")
    monkeypatch.setenv("GPTOSS_ATTN_FULL", "full_once32")
    ops = TritonOps()
    assert ops._decode_variant(1, 128) is WINDOW["win_sink"]
    assert ops._decode_variant(1, 0) is FULL["full_once32"]
    monkeypatch.setenv("GPTOSS_ATTN_FULL", "win_sink")  # a window candidate on full layers
    with pytest.raises(ValueError, match="GPTOSS_ATTN_FULL"):
        TritonOps()


@pytest.mark.parametrize("dense_gemv_rows", [0, 8])
def test_decode_rows_and_small_projections_reach_the_chosen_kernels(
    monkeypatch: pytest.MonkeyPatch, dense_gemv_rows: int
) -> None:
    import runtime.ops_triton as ot
    from kernels.decode_latency import FULL, WINDOW
    from runtime.ops_switches import ATTN_FULL, ATTN_WINDOW

    configs, gemv_rows = [], []
    decode_attention, linear_small = ot.decode_attention, ot.linear_small

    def spy_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        configs.append(kwargs.get("config"))
        return decode_attention(*args, **kwargs)

    def spy_linear(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        gemv_rows.append(x.shape[0])
        return linear_small(x, *args, **kwargs)

    monkeypatch.setattr(ot, "decode_attention", spy_decode)
    monkeypatch.setattr(ot, "linear_small", spy_linear)
    ops = TritonOps(dense_gemv_rows)
    ops._moe_forward = None
    model = make_model(ops)
    for plan in steps()[:12]:  # prefill chunks, mixed steps, then decode-only steps
        model.forward(build_batch(plan, "cpu"))
    # ≤ 64 rows: the fused variant, each layer kind's config
    assert configs and all(c in (FULL[ATTN_FULL], WINDOW[ATTN_WINDOW]) for c in configs)
    assert FULL[ATTN_FULL] in configs and WINDOW[ATTN_WINDOW] in configs
    if dense_gemv_rows:
        assert gemv_rows and max(gemv_rows) <= dense_gemv_rows  # qkv and out of small batches
    else:
        assert gemv_rows == []
