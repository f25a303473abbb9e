"""What a decode step must read and what a prefill must compute, for any gpt-oss config.

Decode (memory bound): every dense weight once (bf16), the router, the distinct experts the batch
hits (MXFP4: 16 bytes + 1 scale byte per 32 weights, fp32 biases; E·(1 − (1 − k/E)^B) experts per
layer for B tokens routed at random), the unembedding, and each row's K/V (full layers: the
context; sliding layers: the window). At batch 1 and the 20b shape: attention 1.27 GB + experts
1.27 GB + unembedding 1.16 GB ≈ 3.70 GB (DESIGN §10).
Prefill (compute bound): 2 FLOPs per weight per token for qkv, out, router and the k active
experts, plus attention 4·nq·d per (query, key) pair; one unembedding row.
"""

from __future__ import annotations

from runtime.config import ModelConfig

BF16 = 2


def expert_bytes(cfg: ModelConfig) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    mlp1 = 2 * i * (h // 32) * 17 + 2 * i * 4
    mlp2 = h * (i // 32) * 17 + h * 4
    return float(mlp1 + mlp2)


def attention_weight_bytes(cfg: ModelConfig) -> float:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = h * cfg.qkv_size + cfg.qkv_size
    out = cfg.num_attention_heads * d * h + h
    return float((qkv + out) * BF16)


def keys_read(cfg: ModelConfig, layer: int, context: int) -> int:
    return min(context, cfg.sliding_window) if cfg.is_sliding(layer) else context


def decode_bytes(cfg: ModelConfig, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows, each attending `context` keys, must move."""
    e, k = cfg.num_experts, cfg.experts_per_token
    experts = e * (1 - (1 - k / e) ** batch)
    per_layer = attention_weight_bytes(cfg) + e * cfg.hidden_size * BF16 + experts * expert_bytes(cfg)
    kv_row = cfg.num_key_value_heads * cfg.head_dim * 2 * BF16  # K and V of one position
    kv = sum(batch * keys_read(cfg, i, context) * kv_row for i in range(cfg.num_hidden_layers))
    unembed = cfg.vocab_size * cfg.hidden_size * BF16
    return cfg.num_hidden_layers * per_layer + kv + unembed + batch * cfg.hidden_size * BF16


def prefill_flops(cfg: ModelConfig, prompt: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    dense = h * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * h + cfg.num_experts * h
    experts = cfg.experts_per_token * 3 * i * h
    per_token = 2 * (dense + experts) * cfg.num_hidden_layers
    pairs = 0
    for layer in range(cfg.num_hidden_layers):
        w = cfg.sliding_window if cfg.is_sliding(layer) else prompt
        pairs += sum(min(q + 1, w) for q in range(prompt))
    attn = 4 * cfg.num_attention_heads * cfg.head_dim * pairs
    return float(per_token * prompt + attn + 2 * cfg.vocab_size * h)
