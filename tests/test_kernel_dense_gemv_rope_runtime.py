"""The runtime with rope and the K/V cache write fused into the qkv GEMV (TritonOps(fuse_rope=True),
kernels/dense_gemv_rope.py) runs the tiny model to the same hidden states, greedy tokens and
caches as the unfused path, interpreted on the CPU in float32; the fusion applies exactly on
decode rows (and graph steps) where the fused-norm GEMV runs, and the flag comes from
GPTOSS_FUSE_ROPE (on by default since it was timed faster on an H100, run 53).
"""

from __future__ import annotations

import pytest
import torch

import runtime.ops_switches as switches
import runtime.ops_triton as ot
from runtime.batch import build_batch
from runtime.config import preset
from runtime.ops_triton import TritonOps
from runtime.types import SeqWork, StepPlan
from tests.test_kernel_norm_fused_runtime import (
    LAYERS,
    count_calls,
    make_model,
    prefill_then_decode,
)


def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the fused launches and the standalone rope launches."""
    return count_calls(monkeypatch, ot, {"fused": "norm_linear_rope_small",
                                         "rope": "rope_cache_write"})


def test_fused_rope_gives_the_unfused_hidden_states_tokens_and_caches_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy(monkeypatch)
    steps = 4  # 6 prompt rows, then a mixed step of 4, then two decode steps of 2 rows
    plain = make_model(TritonOps(8, fuse_norm=True, fuse_norm_rows=8, fuse_rope=False))
    plain_h, plain_t = prefill_then_decode(plain, steps)
    assert calls == {"fused": 0, "rope": steps * LAYERS}
    calls.update(fused=0, rope=0)
    fused = make_model(TritonOps(8, fuse_norm=True, fuse_norm_rows=8, fuse_rope=True))
    fused_h, fused_t = prefill_then_decode(fused, steps)
    assert calls == {"fused": 2 * LAYERS, "rope": 2 * LAYERS}  # the decode steps fused
    assert fused_t == plain_t
    for got, want in zip(fused_h, plain_h, strict=True):
        assert torch.equal(got, want)
    for i in range(LAYERS):  # k and v landed in the same cache rows with the same bits
        assert torch.equal(fused.cache.k[i], plain.cache.k[i])
        assert torch.equal(fused.cache.v[i], plain.cache.v[i])


@pytest.mark.parametrize(("ops", "fuses"), [
    (dict(dense_gemv_rows=2, fuse_norm=True, fuse_norm_rows=8), False),  # past the GEMV's rows
    (dict(dense_gemv_rows=8, fuse_norm=True, fuse_norm_rows=2), False),  # past the norm's rows
    (dict(dense_gemv_rows=8, fuse_norm=False, fuse_norm_rows=8), False),  # no fused-norm GEMV
    (dict(dense_gemv_rows=8, fuse_norm=True, fuse_norm_rows=8), True),
])
def test_fused_rope_only_where_the_fused_norm_gemv_runs(
    monkeypatch: pytest.MonkeyPatch, ops: dict, fuses: bool
) -> None:
    """A 3-row decode step: fused only within both row limits, with the norm fused; the same
    hidden states either way."""
    calls = spy(monkeypatch)
    works = tuple(SeqWork(s, (5 + s,), 0, sample=True) for s in range(3))
    plan = StepPlan(works)
    got = make_model(TritonOps(**ops, fuse_rope=True)).hidden(build_batch(plan, "cpu"))
    assert calls == ({"fused": LAYERS, "rope": 0} if fuses else {"fused": 0, "rope": LAYERS})
    want = make_model(TritonOps(**ops, fuse_rope=False)).hidden(build_batch(plan, "cpu"))
    assert torch.equal(got, want)


def test_graph_steps_fuse_and_prompt_steps_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows of a prompt chunk: the unfused launches (rope_cache_write checks chunks against
    the ring); the same rows as a graph step (a tile table: rows checked on the host, padding on
    the dummy slot) go through the fused kernel with the same results."""
    calls = spy(monkeypatch)
    cfg = preset("tiny")
    ops = TritonOps(8, fuse_norm=True, fuse_norm_rows=8, fuse_rope=True)
    model = make_model(ops)
    batch = build_batch(StepPlan((SeqWork(1, (5, 9), 3, sample=True),)), "cpu")
    assert not batch.decode_only and batch.tile_table is None
    layer, eps = model.w.layers[0], cfg.rms_norm_eps
    x = torch.randn(2, cfg.hidden_size)
    caches = [(model.cache.k[0].clone(), model.cache.v[0].clone()) for _ in range(2)]
    args = (x, None, layer.attn_norm, eps, layer.qkv_weight, layer.qkv_bias, model.cos, model.sin)
    want = ops.norm_linear_rope(*args, batch, *caches[0], cfg)
    assert calls == {"fused": 0, "rope": 1}
    batch.tile_table = torch.zeros(1, 4, dtype=torch.int32)  # as a graph step's
    got = ops.norm_linear_rope(*args, batch, *caches[1], cfg)
    assert calls == {"fused": 1, "rope": 1}
    assert torch.equal(got[0], want[0]) and got[1] is x
    assert torch.equal(caches[1][0], caches[0][0]) and torch.equal(caches[1][1], caches[0][1])


def test_fuse_rope_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert switches.FUSE_ROPE is True  # timed faster on the H100 (run 53)
    monkeypatch.delenv("GPTOSS_FUSE_ROPE", raising=False)
    monkeypatch.delenv("GPTOSS_ROPE_ATTN", raising=False)
    assert TritonOps().fuse_rope
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "0")
    assert not TritonOps().fuse_rope
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "1")
    assert TritonOps().fuse_rope
    assert not TritonOps(fuse_rope=False).fuse_rope  # the argument wins
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "maybe")
    with pytest.raises(ValueError, match="GPTOSS_FUSE_ROPE"):
        TritonOps()


def test_warm_compiles_the_fused_launch_at_every_row_count_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TritonOps.warm's rope part: each row count within the limits, with and without a
    residual, writing only the dummy slot."""
    calls = spy(monkeypatch)
    cfg = preset("tiny")
    ops = TritonOps(2, fuse_norm=True, fuse_norm_rows=8, fuse_rope=True)
    model = make_model(ops)
    k_cache, v_cache = model.cache.k[0], model.cache.v[0]
    k_cache.fill_(1.0)
    v_cache.fill_(1.0)
    x = torch.randn(4, cfg.hidden_size)
    ops._warm_rope(model.w.layers[0], cfg, k_cache, v_cache, x, max_rows=4)
    assert calls == {"fused": 4, "rope": 0}  # rows 1 and 2 (dense_gemv_rows), × 2
    dummy = k_cache.shape[0] - 1
    assert not torch.equal(k_cache[dummy, 0], torch.ones_like(k_cache[dummy, 0]))
    assert torch.equal(k_cache[:dummy], torch.ones_like(k_cache[:dummy]))
    assert torch.equal(v_cache[:dummy], torch.ones_like(v_cache[:dummy]))
