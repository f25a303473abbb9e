"""Tensor names, shapes and kinds of the two gpt-oss checkpoint layouts (DESIGN §4), in one table.

Both the loader (runtime/weights.py) and the writer (runtime/synthetic.py) read this table, so a
name or shape can never disagree between them. Every on-disk tensor is an `Entry` that maps onto
a *canonical* tensor, named as in the original layout:
- original: one entry per canonical tensor, same name and shape;
- Hugging Face: q/k/v projections are row slices of the canonical qkv; unquantized experts
  (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) are the transposed dequantized MXFP4 matrix
  and become canonical `.blocks`/`.scales` by quantizing at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights

ORIGINAL = "original"
HF = "hf"
LAYOUTS = (ORIGINAL, HF)

# Kinds: how a tensor is stored in memory (and which on-disk dtypes are accepted).
DENSE = "dense"  # the model dtype (bf16/fp32); any float on disk
FP32 = "fp32"  # norms, sinks, expert biases: fp32 in memory; any float on disk
U8 = "u8"  # MXFP4 blocks/scales: exactly uint8 on disk
DENSE_EXPERTS = "dense_experts"  # unquantized HF experts [E, K, N]: any float; quantized at load

FLOAT_DTYPES = ("F32", "BF16", "F16")
DISK_DTYPE = {
    DENSE: torch.bfloat16,
    FP32: torch.float32,
    U8: torch.uint8,
    DENSE_EXPERTS: torch.bfloat16,
}


@dataclass(frozen=True)
class Entry:
    name: str  # on disk
    shape: tuple[int, ...]  # on disk
    kind: str
    canonical: str  # original-layout name it becomes (without .blocks/.scales for DENSE_EXPERTS)
    rows: tuple[int, int] | None = None  # a row slice [start, stop) of the canonical tensor

    def accepts(self, dtype: str) -> bool:
        return dtype == "U8" if self.kind == U8 else dtype in FLOAT_DTYPES


# ---- canonical (original layout) ------------------------------------------------------------------
def canonical_layer(config: ModelConfig, i: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name → (shape, kind) for layer i."""
    h, e = config.hidden_size, config.num_experts
    two_i, inter = 2 * config.intermediate_size, config.intermediate_size
    a, m = f"block.{i}.attn.", f"block.{i}.mlp."
    return {
        a + "norm.scale": ((h,), FP32),
        a + "qkv.weight": ((config.qkv_size, h), DENSE),
        a + "qkv.bias": ((config.qkv_size,), DENSE),
        a + "sinks": ((config.num_attention_heads,), FP32),
        a + "out.weight": ((h, config.q_size), DENSE),
        a + "out.bias": ((h,), DENSE),
        m + "norm.scale": ((h,), FP32),
        m + "gate.weight": ((e, h), DENSE),
        m + "gate.bias": ((e,), DENSE),
        m + "mlp1_weight.blocks": ((e, two_i, h // 32, 16), U8),
        m + "mlp1_weight.scales": ((e, two_i, h // 32), U8),
        m + "mlp1_bias": ((e, two_i), FP32),
        m + "mlp2_weight.blocks": ((e, h, inter // 32, 16), U8),
        m + "mlp2_weight.scales": ((e, h, inter // 32), U8),
        m + "mlp2_bias": ((e, h), FP32),
    }


def canonical_head(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    v, h = config.vocab_size, config.hidden_size
    return {"embedding.weight": ((v, h), DENSE)}


def canonical_tail(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    v, h = config.vocab_size, config.hidden_size
    return {"norm.scale": ((h,), FP32), "unembedding.weight": ((v, h), DENSE)}


_LAYER_FIELDS = {
    "attn.norm.scale": "attn_norm",
    "attn.qkv.weight": "qkv_weight",
    "attn.qkv.bias": "qkv_bias",
    "attn.sinks": "sinks",
    "attn.out.weight": "out_weight",
    "attn.out.bias": "out_bias",
    "mlp.norm.scale": "mlp_norm",
    "mlp.gate.weight": "gate_weight",
    "mlp.gate.bias": "gate_bias",
    "mlp.mlp1_weight.blocks": "mlp1_blocks",
    "mlp.mlp1_weight.scales": "mlp1_scales",
    "mlp.mlp1_bias": "mlp1_bias",
    "mlp.mlp2_weight.blocks": "mlp2_blocks",
    "mlp.mlp2_weight.scales": "mlp2_scales",
    "mlp.mlp2_bias": "mlp2_bias",
}


def layer_to_canonical(i: int, layer: LayerWeights) -> dict[str, torch.Tensor]:
    return {f"block.{i}.{key}": getattr(layer, field) for key, field in _LAYER_FIELDS.items()}


def layer_from_canonical(i: int, tensors: dict[str, torch.Tensor]) -> LayerWeights:
    return LayerWeights(
        **{field: tensors[f"block.{i}.{key}"] for key, field in _LAYER_FIELDS.items()}
    )


# ---- on-disk entries ------------------------------------------------------------------------------
def head_entries(config: ModelConfig, layout: str) -> list[Entry]:
    (shape, kind), = canonical_head(config).values()
    name = "embedding.weight" if layout == ORIGINAL else "model.embed_tokens.weight"
    return [Entry(name, shape, kind, "embedding.weight")]


def tail_entries(config: ModelConfig, layout: str) -> list[Entry]:
    spec = canonical_tail(config)
    if layout == ORIGINAL:
        return [Entry(n, s, k, n) for n, (s, k) in spec.items()]
    return [
        Entry("model.norm.weight", *spec["norm.scale"], "norm.scale"),
        Entry("lm_head.weight", *spec["unembedding.weight"], "unembedding.weight"),
    ]


def layer_entries(config: ModelConfig, i: int, layout: str, quantized: bool = True) -> list[Entry]:
    spec = canonical_layer(config, i)
    if layout == ORIGINAL:
        return [Entry(n, s, k, n) for n, (s, k) in spec.items()]
    if layout != HF:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    a, m = f"block.{i}.attn.", f"block.{i}.mlp."
    p = f"model.layers.{i}."
    h, e = config.hidden_size, config.num_experts
    q, kv = config.q_size, config.kv_size
    bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    out = [Entry(p + "input_layernorm.weight", (h,), FP32, a + "norm.scale")]
    for proj, (lo, hi) in bounds.items():
        out.append(Entry(p + f"self_attn.{proj}_proj.weight", (hi - lo, h), DENSE,
                         a + "qkv.weight", (lo, hi)))
        out.append(Entry(p + f"self_attn.{proj}_proj.bias", (hi - lo,), DENSE,
                         a + "qkv.bias", (lo, hi)))
    out += [
        Entry(p + "self_attn.o_proj.weight", (h, q), DENSE, a + "out.weight"),
        Entry(p + "self_attn.o_proj.bias", (h,), DENSE, a + "out.bias"),
        Entry(p + "self_attn.sinks", spec[a + "sinks"][0], FP32, a + "sinks"),
        Entry(p + "post_attention_layernorm.weight", (h,), FP32, m + "norm.scale"),
        Entry(p + "mlp.router.weight", (e, h), DENSE, m + "gate.weight"),
        Entry(p + "mlp.router.bias", (e,), DENSE, m + "gate.bias"),
    ]
    x = p + "mlp.experts."
    for hf, ours in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
        blocks_shape = spec[m + f"{ours}_weight.blocks"][0]  # [E, N, K/32, 16]
        if quantized:
            out.append(Entry(x + f"{hf}_blocks", blocks_shape, U8, m + f"{ours}_weight.blocks"))
            out.append(Entry(x + f"{hf}_scales", blocks_shape[:-1], U8,
                             m + f"{ours}_weight.scales"))
        else:
            n_out, k_in = blocks_shape[1], blocks_shape[2] * 32
            out.append(Entry(x + hf, (e, k_in, n_out), DENSE_EXPERTS, m + f"{ours}_weight"))
        out.append(Entry(x + f"{hf}_bias", spec[m + f"{ours}_bias"][0], FP32, m + f"{ours}_bias"))
    return out


def all_entries(config: ModelConfig, layout: str, quantized: bool = True) -> list[Entry]:
    out = head_entries(config, layout)
    for i in range(config.num_hidden_layers):
        out += layer_entries(config, i, layout, quantized)
    return out + tail_entries(config, layout)


def detect_layout(names: set[str]) -> str | None:
    if "embedding.weight" in names or any(n.startswith("block.") for n in names):
        return ORIGINAL
    if any(n.startswith("model.") for n in names):
        return HF
    return None


def hf_quantized(names: set[str]) -> bool:
    """Whether an HF checkpoint stores MXFP4 experts (else dense ones), judged by layer 0."""
    return "model.layers.0.mlp.experts.gate_up_proj" not in names
