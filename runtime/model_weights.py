"""In-memory weights of a gpt-oss model, independent of the checkpoint layout they came from.

Every loader (runtime/weights.py) and writer (runtime/synthetic.py) speaks this one structure.
Expert weights stay MXFP4 (u8 blocks + u8 scales); everything else is in the model dtype except
the norm scales and sinks, which stay fp32 (DESIGN §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H] fp32
    qkv_weight: torch.Tensor  # [(nq + 2·nkv)·d, H]; rows: q heads, then k heads, then v heads
    qkv_bias: torch.Tensor  # [(nq + 2·nkv)·d]
    sinks: torch.Tensor  # [nq] fp32
    out_weight: torch.Tensor  # [H, nq·d]
    out_bias: torch.Tensor  # [H]
    mlp_norm: torch.Tensor  # [H] fp32
    gate_weight: torch.Tensor  # [E, H] router
    gate_bias: torch.Tensor  # [E]
    mlp1_blocks: torch.Tensor  # [E, 2I, H/32, 16] u8; rows interleave gate (even) / linear (odd)
    mlp1_scales: torch.Tensor  # [E, 2I, H/32] u8
    mlp1_bias: torch.Tensor  # [E, 2I] fp32
    mlp2_blocks: torch.Tensor  # [E, H, I/32, 16] u8
    mlp2_scales: torch.Tensor  # [E, H, I/32] u8
    mlp2_bias: torch.Tensor  # [E, H] fp32


@dataclass
class ModelWeights:
    config: ModelConfig
    embedding: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H] fp32
    unembedding: torch.Tensor  # [V, H]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ModelWeights:
        """Move to `device`; dense weights take `dtype`, norms/sinks/expert biases stay fp32."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        layers = [
            LayerWeights(
                attn_norm=layer.attn_norm.to(device, torch.float32),
                qkv_weight=cast(layer.qkv_weight),
                qkv_bias=cast(layer.qkv_bias),
                sinks=layer.sinks.to(device, torch.float32),
                out_weight=cast(layer.out_weight),
                out_bias=cast(layer.out_bias),
                mlp_norm=layer.mlp_norm.to(device, torch.float32),
                gate_weight=cast(layer.gate_weight),
                gate_bias=cast(layer.gate_bias),
                mlp1_blocks=layer.mlp1_blocks.to(device),
                mlp1_scales=layer.mlp1_scales.to(device),
                mlp1_bias=layer.mlp1_bias.to(device, torch.float32),
                mlp2_blocks=layer.mlp2_blocks.to(device),
                mlp2_scales=layer.mlp2_scales.to(device),
                mlp2_bias=layer.mlp2_bias.to(device, torch.float32),
            )
            for layer in self.layers
        ]
        return ModelWeights(
            config=self.config,
            embedding=cast(self.embedding),
            layers=layers,
            norm=self.norm.to(device, torch.float32),
            unembedding=cast(self.unembedding),
        )
