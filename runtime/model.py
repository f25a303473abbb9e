"""The gpt-oss forward pass over a packed batch of slots (DESIGN §3).

embedding → N × [x += attn(norm(x)); x += moe(norm(x))] → norm → unembedding, with every residual add
fused into the following norm. Logits are computed only for the rows that sample.
"""

from __future__ import annotations

import torch

from runtime.batch import Batch
from runtime.config import ModelConfig
from runtime.kv_cache import KVCache
from runtime.model_weights import ModelWeights
from runtime.ops import Ops, TorchOps
from runtime.rope import rope_table


class Model:
    def __init__(
        self, weights: ModelWeights, cache: KVCache, max_positions: int, ops: Ops | None = None
    ) -> None:
        self.w = weights
        self.config: ModelConfig = weights.config
        self.cache = cache
        self.ops: Ops = ops or TorchOps()
        self.ops.prepare(weights)
        device = weights.embedding.device
        self.cos, self.sin = rope_table(self.config, max_positions, device)  # [P, d/2] each
        self.scale = self.config.head_dim**-0.5

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns fp32 logits [M, V] for `batch.logits_rows`."""
        return self.unembed(self.hidden(batch)[batch.logits_rows])

    @torch.inference_mode()
    def hidden(self, batch: Batch) -> torch.Tensor:
        """The final normed hidden state of every row, [T, H]: everything but the unembedding
        (row-wise from the last layer on, so selecting rows before or after the norm is the same)."""
        cfg, ops, eps = self.config, self.ops, self.config.rms_norm_eps
        # The residual stream is resid + delta; each norm adds the two (the first layer's has
        # no resid: the embedding is the stream) and is fused into the op after it when the
        # backend can (Ops.norm_linear / norm_moe).
        delta, resid = self.w.embedding[batch.token_ids], None  # [T, H]
        for i, layer in enumerate(self.w.layers):
            # qkv projection, rope, the K/V cache write and attention (Ops.norm_qkv_attention:
            # the backend may fuse rope into the projection or into the attention)
            window = cfg.sliding_window if cfg.is_sliding(i) else 0
            o, resid = ops.norm_qkv_attention(
                delta, resid, layer.attn_norm, eps, layer.qkv_weight, layer.qkv_bias, self.cos,
                self.sin, batch, self.cache.k[i], self.cache.v[i], layer.sinks, window,
                self.scale, cfg)  # [T, nq, d]
            attn_out = ops.linear(o.reshape(o.shape[0], -1), layer.out_weight,
                                  layer.out_bias)  # [T, H]
            delta, resid = ops.norm_moe(attn_out, resid, layer.mlp_norm, eps, layer, cfg)
        h, _ = ops.rmsnorm(delta, self.w.norm, eps, resid)
        return h

    @torch.inference_mode()
    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [M, V] of normed hidden rows [M, H]."""
        return torch.nn.functional.linear(h, self.w.unembedding).float()
