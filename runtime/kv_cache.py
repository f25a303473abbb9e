"""Per-slot KV caches: `k, v: [max_slots + 1, capacity, n_kv, d]` per layer (DESIGN §5).

Row `max_slots` is the dummy slot that pads CUDA-graph batches. Full-attention layers hold
`max_context` positions; sliding-window layers are ring buffers indexed by `position % capacity`
with capacity `window + max_chunk_tokens − 1` (or max_context if smaller): attention runs after a
chunk's keys are written, so the ring must still hold the window behind the chunk's first query.
A slot's contents outlive its request (prefix reuse): reusing p of L cached tokens is safe on the
ring when L − p ≤ capacity − window (`prefix_reuse_slack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import ModelConfig


@dataclass(frozen=True)
class CacheShape:
    max_slots: int
    max_context: int
    max_chunk_tokens: int

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_context", "max_chunk_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def capacity(self, config: ModelConfig, layer: int) -> int:
        if not config.is_sliding(layer):
            return self.max_context
        return min(self.max_context, config.sliding_window + self.max_chunk_tokens - 1)

    def prefix_reuse_slack(self, config: ModelConfig) -> int:
        if not any(config.is_sliding(i) for i in range(config.num_hidden_layers)):
            return self.max_context
        ring = min(self.capacity(config, i) for i in range(config.num_hidden_layers))
        return max(0, ring - config.sliding_window) if ring < self.max_context else self.max_context

    def bytes_per_slot(self, config: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_pos = 2 * config.num_key_value_heads * config.head_dim * elem
        return sum(self.capacity(config, i) * per_pos for i in range(config.num_hidden_layers))


class KVCache:
    def __init__(
        self, config: ModelConfig, shape: CacheShape, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.shape = shape
        self.dummy_slot = shape.max_slots
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_hidden_layers):
            cap = shape.capacity(config, layer)
            dims = (shape.max_slots + 1, cap, config.num_key_value_heads, config.head_dim)
            self.k.append(torch.zeros(dims, device=device, dtype=dtype))  # [S+1, C, nkv, d]
            self.v.append(torch.zeros(dims, device=device, dtype=dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
