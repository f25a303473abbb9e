"""Random weights keep a real forward pass sane: finite, unit-ish activations through every layer,
routing and greedy tokens that vary with the input; seeds are reproducible; the CLI writes one.

The forward here is a deliberately plain re-statement of DESIGN §3 (torch + mxfp4.dequantize
only) so these checks do not depend on runtime/model.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from runtime.checkpoint_layout import layer_to_canonical
from runtime.config import ModelConfig, preset
from runtime.model_weights import ModelWeights
from runtime.mxfp4 import dequantize
from runtime.synthetic import builtin_tiny, random_weights
from runtime.weights import load_checkpoint, load_tokenizer

MID = ModelConfig(
    vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=16,
    experts_per_token=4, sliding_window=8, max_position_embeddings=4096,
)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def _norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:  # [T, heads, d], NeoX halves
    t, _, d = x.shape
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * freq  # [T, d/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)


# id → (the weights, kept alive so the id cannot be reused; their dense experts)
_DENSE: dict[int, tuple[ModelWeights, list[tuple[torch.Tensor, torch.Tensor]]]] = {}


def _dense_experts(w: ModelWeights) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ([E, 2I, H], [E, H, I]) fp32 expert matrices, dequantized once per model."""
    if id(w) not in _DENSE:
        _DENSE[id(w)] = (w, [(dequantize(layer.mlp1_blocks, layer.mlp1_scales),
                              dequantize(layer.mlp2_blocks, layer.mlp2_scales))
                             for layer in w.layers])
    return _DENSE[id(w)][1]


def forward(w: ModelWeights, ids: list[int]) -> tuple[torch.Tensor, list[dict[str, float]], list]:
    """fp32 logits [T, V], per-layer activation stats, per-layer chosen experts [T, k]."""
    cfg = w.config
    experts = _dense_experts(w)
    eps, t, d = cfg.rms_norm_eps, len(ids), cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    x = w.embedding[torch.tensor(ids)].float()  # [T, H]
    stats, routes = [], []
    pos = torch.arange(t)
    for i, layer in enumerate(w.layers):
        h = _norm(x, layer.attn_norm, eps)
        qkv = h @ layer.qkv_weight.float().T + layer.qkv_bias.float()
        q = _rope(qkv[:, : cfg.q_size].view(t, nq, d), cfg.rope_theta)
        k = _rope(qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(t, nkv, d), cfg.rope_theta)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(t, nkv, d)
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5  # [nq, T, T]
        allowed = pos[:, None] >= pos[None, :]
        if cfg.is_sliding(i):
            allowed &= pos[:, None] - pos[None, :] < cfg.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = layer.sinks.view(nq, 1, 1).expand(nq, t, 1)
        p = torch.softmax(torch.cat((scores, sink), -1), -1)[..., :t]
        o = torch.einsum("hqk,khd->qhd", p, v).reshape(t, -1)
        attn = o @ layer.out_weight.float().T + layer.out_bias.float()
        x = x + attn
        h = _norm(x, layer.mlp_norm, eps)
        router = h @ layer.gate_weight.float().T + layer.gate_bias.float()  # [T, E]
        top = router.topk(cfg.experts_per_token, -1)
        gates = torch.softmax(top.values, -1)  # [T, k]
        w1 = experts[i][0][top.indices]  # [T, k, 2I, H]
        w2 = experts[i][1][top.indices]  # [T, k, H, I]
        up = torch.einsum("tkoh,th->tko", w1, h) + layer.mlp1_bias[top.indices]
        g = up[..., ::2].clamp(max=cfg.swiglu_limit)
        lin = up[..., 1::2].clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
        act = g * torch.sigmoid(cfg.swiglu_alpha * g) * (lin + 1)
        down = torch.einsum("tkoi,tki->tko", w2, act) + layer.mlp2_bias[top.indices]
        moe = (gates.unsqueeze(-1) * down).sum(1)
        x = x + moe
        stats.append({
            "attn": _rms(attn).mean().item(), "expert_in": _rms(up).mean().item(),
            "moe": _rms(moe).mean().item(), "resid": _rms(x).mean().item(),
        })
        routes.append(top.indices)
    logits = _norm(x, w.norm, eps) @ w.unembedding.float().T
    return logits, stats, routes


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [100, 50, 25, 12, 6, 3], [255] * 12, [72, 105, 33]]


@pytest.mark.parametrize("config", [preset("tiny"), MID], ids=["tiny", "mid"])
def test_activations_stay_sane_through_every_layer(config):
    w = random_weights(config, seed=1, dtype=torch.float32)
    for ids in PROMPTS:
        logits, stats, routes = forward(w, ids)
        assert torch.isfinite(logits).all()
        for i, s in enumerate(stats):
            assert 0.1 < s["attn"] < 4, (i, s)
            assert 0.3 < s["expert_in"] < 3, (i, s)  # W1·x keeps the activation scale
            assert 0.05 < s["moe"] < 4, (i, s)
            assert 0.5 < s["resid"] < 2 * (1 + 2 * (i + 1)) ** 0.5, (i, s)
        assert 0.3 < logits.std().item() < 10
        # routing varies: different tokens do not all pick the same experts (a prompt of one
        # repeated token routes identically everywhere: attention over equal values is that value)
        for chosen in routes if len(set(ids)) > 1 else []:
            assert len({tuple(sorted(r.tolist())) for r in chosen}) > 1


@pytest.mark.parametrize("config", [preset("tiny"), MID], ids=["tiny", "mid"])
def test_greedy_tokens_are_not_constant(config):
    w = random_weights(config, seed=2)  # bf16 weights, as served
    greedy = set()
    for ids in PROMPTS:
        greedy |= set(forward(w, ids)[0].argmax(-1).tolist())
    assert len(greedy) >= 4, greedy


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = preset("tiny")
    a, b, c = random_weights(cfg, 7), random_weights(cfg, 7), random_weights(cfg, 8)
    fa, fb, fc = (layer_to_canonical(1, x.layers[1]) for x in (a, b, c))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.unembedding, b.unembedding)
    assert not any(torch.equal(fa[k], fc[k]) for k in fa if "norm" not in k and "scales" not in k)
    assert not torch.equal(a.embedding, c.embedding)
    # layers draw from their own streams
    assert not torch.equal(a.layers[0].qkv_weight, a.layers[1].qkv_weight)


def test_weights_have_the_documented_kinds_and_scales():
    w = random_weights(MID, seed=3)
    layer = w.layers[0]
    assert layer.mlp1_blocks.dtype == torch.uint8 and layer.mlp1_blocks.shape == (16, 512, 8, 16)
    assert layer.mlp2_scales.shape == (16, 256, 8)
    assert layer.attn_norm.dtype == torch.float32 and layer.sinks.dtype == torch.float32
    assert layer.qkv_weight.dtype == torch.bfloat16
    assert 0.8 < _rms(w.embedding.float()).mean() < 1.2
    assert (layer.attn_norm - 1).abs().max() < 0.5
    # several distinct scales per matrix (kernels must index them right), around one base value
    assert len(layer.mlp1_scales.unique()) == 3
    # every group's maximum is ±6 so the dequantized values re-quantize to the same bytes
    codes = torch.stack((layer.mlp1_blocks & 15, layer.mlp1_blocks >> 4), -1).flatten(-2)
    assert ((codes & 7) == 7).any(-1).all()


def test_builtin_tiny_warns_and_round_trips_text(caplog):
    with caplog.at_level(logging.WARNING):
        config, weights, tok = builtin_tiny()
    assert "RANDOM WEIGHTS" in caplog.text
    assert config == preset("tiny") and weights.embedding.shape == (259, 64)
    assert tok.vocab_size == 259 and tok.token_to_id("<|endoftext|>") == 257
    assert tok.decode(tok.encode("héllo")) == "héllo"
    _, again, _ = builtin_tiny()
    assert torch.equal(weights.unembedding, again.unembedding)


def test_make_checkpoint_cli(tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "ckpt"
    rc = main(["make-checkpoint", "--shape", "tiny", "--layout", "hf", "--unquantized",
               "--seed", "4", str(out)])
    assert rc == 0 and str(out) in capsys.readouterr().out
    loaded = load_checkpoint(out)
    expected = random_weights(preset("tiny"), 4)
    assert torch.equal(loaded.layers[3].mlp2_blocks, expected.layers[3].mlp2_blocks)
    assert torch.equal(loaded.embedding, expected.embedding)
    assert loaded.config.eos_token_ids == (257,)
    assert load_tokenizer(out).decode([104, 105]) == "hi"
    # refuses to overwrite unless forced
    with pytest.raises(SystemExit):
        main(["make-checkpoint", "--shape", "tiny", str(out)])
    assert main(["make-checkpoint", "--shape", "tiny", "--force", "--seed", "4", str(out)]) == 0
    assert torch.equal(load_checkpoint(out).layers[0].qkv_weight, expected.layers[0].qkv_weight)
