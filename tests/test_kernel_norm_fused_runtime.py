"""The runtime with the norms fused into their consumers (TritonOps(fuse_norm=True): the qkv GEMV's
and the MoE router's prologues) runs the tiny model to the same hidden states, logits and greedy
tokens as with the standalone norms, interpreted on the CPU in float32 with the MoE kernels; and
it really calls the fused kernels (a runtime that silently fell back would fail here).
GPU (-m gpu): fused vs unfused logits in float32 through the engine's model, and the fused
kernels captured in the decode CUDA graphs replaying the eager steps' tokens in bf16.
"""

from __future__ import annotations

import pytest
import torch

import kernels.moe as moe
import runtime.ops_switches as switches
import runtime.ops_triton as ot
from runtime.batch import build_batch
from runtime.config import preset
from runtime.kv_cache import CacheShape, KVCache
from runtime.model import Model
from runtime.ops import TorchOps
from runtime.ops_triton import TritonOps
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan

LAYERS = preset("tiny").num_hidden_layers


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object,
                names: dict[str, str]) -> dict[str, int]:
    """Wraps module.<name> for each key's name (still calling it); calls[key] counts them."""
    calls = dict.fromkeys(names, 0)

    def counting(key: str, real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[key] += 1
            return real(*args, **kwargs)
        return call

    for key, name in names.items():
        monkeypatch.setattr(module, name, counting(key, getattr(module, name)))
    return calls


def make_model(ops) -> Model:  # noqa: ANN001
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=11, device="cpu", dtype=torch.float32)
    shape = CacheShape(max_slots=2, max_context=64, max_chunk_tokens=8)
    return Model(weights, KVCache(cfg, shape, "cpu", torch.float32), 64, ops=ops)


def prefill_then_decode(model: Model, steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Slot 0 prefills 6 tokens, slot 1 joins with 3 (a mixed step), then both decode greedily:
    every step's hidden states and each slot's tokens."""
    hidden, tokens = [], [[], []]
    plans = [StepPlan((SeqWork(0, (5, 9, 200, 13, 1, 7), 0, sample=True),))]
    nxt = None
    for i in range(steps):
        if i == 1:
            plans.append(StepPlan((SeqWork(0, (nxt[0],), 6, sample=True),
                                   SeqWork(1, (3, 4, 5), 0, sample=True))))
        elif i > 1:
            plans.append(StepPlan((SeqWork(0, (nxt[0],), 5 + i, sample=True),
                                   SeqWork(1, (nxt[1],), 1 + i, sample=True))))
        batch = build_batch(plans[-1], "cpu")
        h = model.hidden(batch)
        hidden.append(h)
        logits = model.unembed(h[batch.logits_rows])
        picks = logits.argmax(dim=-1).tolist()
        nxt = picks if len(picks) == 2 else [picks[0], None]
        for slot, tok in enumerate(picks):
            tokens[slot].append(tok)
    return hidden, tokens


def test_fused_norms_give_the_unfused_hidden_states_and_tokens_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = {"gemv": 0, "router": 0, "rmsnorm": 0}
    real_gemv, real_route, real_norm = ot.norm_linear_small, moe.route_fused, ot.rmsnorm

    def spy_gemv(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["gemv"] += 1
        return real_gemv(*args, **kwargs)

    def spy_route(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["router"] += kwargs.get("norm") is not None
        return real_route(*args, **kwargs)

    def spy_norm(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["rmsnorm"] += 1
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(ot, "norm_linear_small", spy_gemv)
    monkeypatch.setattr(moe, "route_fused", spy_route)
    monkeypatch.setattr(ot, "rmsnorm", spy_norm)
    steps = 4
    plain_h, plain_t = prefill_then_decode(make_model(TritonOps(8, fuse_norm=False)), steps)
    assert calls == {"gemv": 0, "router": 0, "rmsnorm": steps * (2 * LAYERS + 1)}
    calls.update(gemv=0, router=0, rmsnorm=0)
    # (rope in the qkv GEMV off: this counts the plain fused-norm GEMV; dense_gemv_rope's own
    # runtime test covers the two fusions together)
    fused_ops = TritonOps(8, fuse_norm=True, fuse_norm_rows=8, fuse_rope=False)
    fused_h, fused_t = prefill_then_decode(make_model(fused_ops), steps)
    # Every step has ≤ 8 rows (6, 4, 2, 2): the qkv norm of every layer fused, the MoE norm
    # wherever the MoE config has the fused router (not at 6 tokens on 8 experts, where
    # moe_forward_norm runs the standalone norm itself), only the final norm through the ops.
    cfg = preset("tiny")
    routed = sum(moe.choose_config(t, cfg.experts_per_token, cfg.num_experts).fused_router
                 for t in (6, 4, 2, 2))
    assert routed == 3
    assert calls == {"gemv": steps * LAYERS, "router": routed * LAYERS, "rmsnorm": steps}
    assert fused_t == plain_t
    for got, want in zip(fused_h, plain_h, strict=True):
        assert torch.equal(got, want)
    torch_h, torch_t = prefill_then_decode(make_model(TorchOps()), steps)
    assert torch_t == fused_t
    for got, want in zip(fused_h, torch_h, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("gemv_rows", "norm_rows", "moe_fuses"),
    [
        (2, 4, True),  # 3 rows: past dense_gemv_rows only, so the MoE norm alone is fused
        (8, 2, False),  # past fuse_norm_rows: both norms standalone
    ],
)
def test_fused_norms_stay_off_past_their_row_limits(
    monkeypatch: pytest.MonkeyPatch, gemv_rows: int, norm_rows: int, moe_fuses: bool
) -> None:
    """A 3-row batch: the qkv GEMV's norm fused only within fuse_norm_rows and dense_gemv_rows,
    the MoE's only within fuse_norm_rows; past them the standalone norm, same hidden states."""
    calls = {"gemv": 0, "moe": 0}
    real_moe = moe.moe_forward_norm

    def spy_moe(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["moe"] += 1
        return real_moe(*args, **kwargs)

    monkeypatch.setattr(ot, "norm_linear_small",
                        lambda *a, **k: calls.update(gemv=calls["gemv"] + 1))  # would crash
    monkeypatch.setattr(moe, "moe_forward_norm", spy_moe)  # TritonOps looks it up at __init__
    model = make_model(TritonOps(gemv_rows, fuse_norm=True, fuse_norm_rows=norm_rows))
    batch = build_batch(StepPlan((SeqWork(0, (5, 9, 200), 0, sample=True),)), "cpu")  # 3 rows
    want = make_model(TritonOps(gemv_rows, fuse_norm=False))
    assert torch.equal(model.hidden(batch), want.hidden(batch))
    assert calls == {"gemv": 0, "moe": LAYERS if moe_fuses else 0}


def test_exact_norm_scales_reach_the_gemv_in_the_activation_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint norms hold bf16 values: prepare keeps a copy in the activation dtype for the
    fused qkv GEMV (same products, loaded as x is); norms that do not fit stay fp32."""
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=2, device="cpu", dtype=torch.float16)
    exact, inexact = weights.layers[0], weights.layers[1]
    exact.attn_norm = exact.attn_norm.half().float()
    inexact.attn_norm = inexact.attn_norm.half().float() + 2**-20
    ops = TritonOps(8, fuse_norm=True)
    ops.prepare(weights)
    assert ops._scales[id(exact.attn_norm)][1].dtype == torch.float16
    assert id(inexact.attn_norm) not in ops._scales
    seen = []
    monkeypatch.setattr(ot, "norm_linear_small", lambda x, r, scale, *a: seen.append(scale.dtype))
    x = torch.randn(2, cfg.hidden_size).half()
    for layer in (exact, inexact):
        ops.norm_linear(x, None, layer.attn_norm, 1e-5, layer.qkv_weight, layer.qkv_bias)
    assert seen == [torch.float16, torch.float32]


def test_fuse_norm_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # as timed on the H100 (run 45)
    assert switches.FUSE_NORM is True and switches.FUSE_NORM_ROWS == 2
    monkeypatch.setenv("GPTOSS_FUSE_NORM", "1")
    monkeypatch.setenv("GPTOSS_FUSE_NORM_ROWS", "2")
    ops = TritonOps()
    assert ops.fuse_norm and ops.fuse_norm_rows == 2
    monkeypatch.setenv("GPTOSS_FUSE_NORM", "0")
    assert not TritonOps().fuse_norm
    monkeypatch.setenv("GPTOSS_FUSE_NORM", "maybe")
    with pytest.raises(ValueError, match="GPTOSS_FUSE_NORM"):
        TritonOps()


def gpu_engine(monkeypatch: pytest.MonkeyPatch, fuse: bool, **kw):  # noqa: ANN201
    from runtime.engine import Engine, EngineConfig

    monkeypatch.setenv("GPTOSS_FUSE_NORM", "1" if fuse else "0")
    monkeypatch.setenv("GPTOSS_DENSE_GEMV_ROWS", "8")
    monkeypatch.setenv("GPTOSS_FUSE_NORM_ROWS", "8")  # the fused kernels at every row count tested
    cfg = dict(device="cuda", dtype="bfloat16", max_slots=8, max_context=1024,
               max_chunk_tokens=256, kernels="triton", cuda_graphs=False)
    cfg.update(kw)
    e = Engine(EngineConfig(**cfg))
    e.warmup()
    assert e.model.ops.fuse_norm == fuse
    return e


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_norms_give_the_unfused_logits_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode steps of 1…8 rows through the engine's model, float32: compiled, the fused norms'
    sums of squares may be ordered differently, far below 1e-4 of the logits."""
    plain = gpu_engine(monkeypatch, False, dtype="float32")
    fused = gpu_engine(monkeypatch, True, dtype="float32")
    for rows in (1, 2, 3, 8):
        works = tuple(SeqWork(s, ((7 * s + rows) % 250,), 20 + s, sample=True)
                      for s in range(rows))
        batch = build_batch(StepPlan(works), "cuda")
        want = plain.model.forward(batch)
        got = fused.model.forward(build_batch(StepPlan(works), "cuda"))
        err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        assert err < 1e-4, f"{rows} rows: fused logits differ by {err:.3g} relative"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_norms_replay_in_decode_graphs_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, every decode graph bucket: the fused kernels captured and replayed give the tokens
    of the same steps run eagerly (capturable: no host syncs, grids fixed by the batch size)."""
    from tests.test_gpu_runtime import assert_decode_graphs_replay_as_eager

    eager = gpu_engine(monkeypatch, True)
    graphed = gpu_engine(monkeypatch, True, cuda_graphs=True, step_graphs=False)
    assert_decode_graphs_replay_as_eager(eager, graphed)
