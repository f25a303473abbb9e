"""The runtime with rope and the K/V cache write fused into the decode attention
(TritonOps(rope_attn=True), kernels/decode_rope_attention.py) runs the tiny model to the unfused
path's greedy tokens, hidden states (to fp32 rounding: the new key's score is summed in another
order) and caches, interpreted on the CPU in float32; the fusion applies exactly on decode-only
steps within the fused-merge kernel's rows, the qkv projection then being the plain norm_linear; the
flag comes from GPTOSS_ROPE_ATTN (off by default: timed slower than the GEMV fusion, run 53), turns
the default GPTOSS_FUSE_ROPE off and excludes it when both are asked for.
"""

from __future__ import annotations

import pytest
import torch

import runtime.ops_switches as switches
import runtime.ops_triton as ot
from runtime.batch import build_batch
from runtime.ops_triton import TritonOps
from runtime.types import SeqWork, StepPlan
from tests.test_kernel_norm_fused_runtime import (
    LAYERS,
    count_calls,
    make_model,
    prefill_then_decode,
)


def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the fused launches, the standalone rope launches and the qkv GEMVs with rope."""
    return count_calls(monkeypatch, ot, {"fused": "rope_decode_attention",
                                         "rope": "rope_cache_write",
                                         "gemv_rope": "norm_linear_rope_small"})


def test_rope_in_attention_gives_the_unfused_tokens_hidden_states_and_caches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy(monkeypatch)
    steps = 4  # 6 prompt rows, then a mixed step of 4, then two decode steps of 2 rows
    plain = make_model(TritonOps(8, fuse_norm=True, fuse_norm_rows=8, rope_attn=False,
                                 fuse_rope=False))
    plain_h, plain_t = prefill_then_decode(plain, steps)
    assert calls == {"fused": 0, "rope": steps * LAYERS, "gemv_rope": 0}
    calls.update(fused=0, rope=0)
    fused = make_model(TritonOps(8, fuse_norm=True, fuse_norm_rows=8, rope_attn=True))
    fused_h, fused_t = prefill_then_decode(fused, steps)
    # the decode steps fused, every layer (both kinds); the prompt and mixed steps did not
    assert calls == {"fused": 2 * LAYERS, "rope": 2 * LAYERS, "gemv_rope": 0}
    assert fused_t == plain_t
    for got, want in zip(fused_h, plain_h, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # layer 0's k and v follow from the tokens alone: the same bits in the same rows; later
    # layers' inherit the attention's rounding
    assert torch.equal(fused.cache.k[0], plain.cache.k[0])
    assert torch.equal(fused.cache.v[0], plain.cache.v[0])
    for i in range(1, LAYERS):
        torch.testing.assert_close(fused.cache.k[i], plain.cache.k[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.cache.v[i], plain.cache.v[i], rtol=1e-5, atol=1e-5)


def decode_step() -> StepPlan:
    """Three slots' decode tokens (the tiny cache has 2 slots + the dummy: slot 2 is the dummy,
    at position 0 as a graph's padding row)."""
    return StepPlan((SeqWork(0, (5,), 4, sample=True), SeqWork(1, (6,), 9, sample=True),
                     SeqWork(2, (7,), 0, sample=True)))


def test_only_decode_steps_the_fused_merge_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step fuses; the same step past the fused-merge kernel's rows (no decode
    variant) or as a graph step (a tile table) takes the two launches; same hidden states."""
    calls = spy(monkeypatch)
    ops = TritonOps(8, fuse_norm=True, fuse_norm_rows=8, rope_attn=True)
    model = make_model(ops)
    want = make_model(TritonOps(8, fuse_norm=True, fuse_norm_rows=8, fuse_rope=False)).hidden(
        build_batch(decode_step(), "cpu"))
    calls.update(rope=0)
    got = model.hidden(build_batch(decode_step(), "cpu"))
    assert calls == {"fused": LAYERS, "rope": 0, "gemv_rope": 0}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ops, "_decode_variant", lambda rows, window: None)
    model.hidden(build_batch(decode_step(), "cpu"))
    assert calls == {"fused": LAYERS, "rope": LAYERS, "gemv_rope": 0}


def test_rope_attn_comes_from_the_environment_and_excludes_fuse_rope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert switches.ROPE_ATTN is False  # timed slower than the GEMV fusion (run 53)
    monkeypatch.delenv("GPTOSS_ROPE_ATTN", raising=False)
    monkeypatch.delenv("GPTOSS_FUSE_ROPE", raising=False)
    assert not TritonOps().rope_attn
    monkeypatch.setenv("GPTOSS_ROPE_ATTN", "1")
    assert TritonOps().rope_attn
    assert not TritonOps().fuse_rope  # rope_attn moves the rope the default fusion would take
    assert not TritonOps(rope_attn=False).rope_attn  # the argument wins
    assert TritonOps(rope_attn=False, fuse_rope=True).fuse_rope
    with pytest.raises(ValueError, match="at most one"):
        TritonOps(fuse_rope=True)
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "1")
    with pytest.raises(ValueError, match="GPTOSS_FUSE_ROPE.*GPTOSS_ROPE_ATTN"):
        TritonOps()
    monkeypatch.setenv("GPTOSS_ROPE_ATTN", "maybe")
    with pytest.raises(ValueError, match="GPTOSS_ROPE_ATTN"):
        TritonOps()


def test_warm_compiles_the_fused_launch_once_per_layer_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TritonOps.warm with rope_attn: one fused launch per cache kind, writing only the dummy
    slot (at position 0)."""
    calls = spy(monkeypatch)
    ops = TritonOps(2, fuse_norm=True, fuse_norm_rows=2, rope_attn=True)
    model = make_model(ops)
    monkeypatch.setattr(ops, "moe", lambda x, layer, config: x)  # only the attention part here
    monkeypatch.setattr(ops, "norm_moe", lambda *args: (args[0], args[0]))
    cfg = model.config
    kinds = [(model.cache.k[i], model.cache.v[i], cfg.sliding_window if cfg.is_sliding(i) else 0)
             for i in (0, 1)]
    assert {w for _, _, w in kinds} == {0, cfg.sliding_window}
    for k, v, _ in kinds:
        k.fill_(1.0)
        v.fill_(1.0)
    ops.warm(model.w, kinds, max_tokens=2, max_rows=2)
    assert calls["fused"] == 2
    for k, v, _ in kinds:
        dummy = k.shape[0] - 1
        assert torch.equal(k[:dummy], torch.ones_like(k[:dummy]))
        assert torch.equal(v[:dummy], torch.ones_like(v[:dummy]))
        assert torch.equal(v[dummy, 0], torch.zeros_like(v[dummy, 0]))  # the zero token's v


def gpu_engine_with(monkeypatch: pytest.MonkeyPatch, rope_attn: bool, **kw):  # noqa: ANN201
    from tests.test_kernel_norm_fused_runtime import gpu_engine

    monkeypatch.delenv("GPTOSS_FUSE_ROPE", raising=False)
    monkeypatch.setenv("GPTOSS_ROPE_ATTN", "1" if rope_attn else "0")
    e = gpu_engine(monkeypatch, True, **kw)
    assert e.model.ops.rope_attn == rope_attn
    return e


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_rope_attn_gives_the_unfused_logits_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode steps of 1…8 rows through the engine's model, float32, compiled: the same logits
    to rounding (the new key's score is summed in another order)."""
    plain = gpu_engine_with(monkeypatch, False, dtype="float32")
    fused = gpu_engine_with(monkeypatch, True, dtype="float32")
    for rows in (1, 2, 3, 8):
        works = tuple(SeqWork(s, ((7 * s + rows) % 250,), 20 + 37 * s, sample=True)
                      for s in range(rows))
        want = plain.model.forward(build_batch(StepPlan(works), "cuda"))
        got = fused.model.forward(build_batch(StepPlan(works), "cuda"))
        err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        assert err < 1e-4, f"{rows} rows: logits with rope in attention differ by {err:.3g}"
    # layer 0's k and v follow from the tokens alone (later layers inherit the rounding): v the
    # same bits, k to the rotation's FMA contraction; the dummy slot (the last row) differs by
    # warm()'s fused launch
    assert torch.equal(fused.model.cache.v[0][:-1], plain.model.cache.v[0][:-1])
    torch.testing.assert_close(fused.model.cache.k[0][:-1], plain.model.cache.k[0][:-1],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_rope_attn_replays_in_decode_graphs_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, every decode graph bucket (padding rows on the dummy slot): the fused launch
    captured and replayed gives the tokens of the same steps run eagerly."""
    from tests.test_gpu_runtime import assert_decode_graphs_replay_as_eager

    eager = gpu_engine_with(monkeypatch, True)
    graphed = gpu_engine_with(monkeypatch, True, cuda_graphs=True, step_graphs=False)
    assert_decode_graphs_replay_as_eager(eager, graphed)
