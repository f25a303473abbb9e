"""The per-layer operations a forward pass needs, behind one interface with two backends.

`TorchOps` runs the kernels' torch references (the CPU path and the oracle); the Triton backend
(runtime/ops_triton.py) swaps in the fused GPU kernels with the same signatures.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.decode_attention import decode_attention_ref
from kernels.moe_ref import moe_ref
from kernels.prefill_attention import prefill_attention_ref
from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import rope_cache_write_ref, split_qkv
from runtime.batch import Batch
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights, ModelWeights


class Ops(Protocol):
    name: str

    def prepare(self, weights: ModelWeights) -> None:
        """Called once at load: repack weights into the layouts the kernels read best."""
        ...

    def rmsnorm(
        self, x: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope_cache_write(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor: ...

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch,
        sinks: torch.Tensor, window: int, scale: float,
    ) -> torch.Tensor: ...

    def moe(self, x: torch.Tensor, layer: LayerWeights, config: ModelConfig) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x·wᵀ + b: the dense projections (attention qkv and out)."""
        ...

    def norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float,
        w: torch.Tensor, b: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm(x, scale, eps, residual) then linear: (projection, new residual stream). A
        backend may fuse the two (kernels/dense_gemv_norm.py) with the same results."""
        ...

    def norm_linear_rope(
        self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float,
        w: torch.Tensor, b: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor, config: ModelConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's input side: norm_linear to qkv [T, (nq+2nkv)·d], then
        rope_cache_write of its q, k, v heads: (rotated q [T, nq, d], new residual stream),
        k and v written into the caches. A backend may fuse it all into the qkv projection
        (kernels/dense_gemv_rope.py) with the same results."""
        ...

    def norm_qkv_attention(
        self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float,
        w: torch.Tensor, b: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
        window: int, attn_scale: float, config: ModelConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention block up to its output projection: norm_linear_rope, then attention of
        the rotated q: (attention output [T, nq, d], new residual stream), k and v written into
        the caches. A backend may fuse rope and the cache write into the attention instead
        (kernels/decode_rope_attention.py) with the same caches and outputs to rounding."""
        ...

    def norm_moe(
        self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float,
        layer: LayerWeights, config: ModelConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm(x, scale, eps, residual) then moe: (block output, new residual stream)."""
        ...


class NormThenOp:
    """norm_linear / norm_linear_rope / norm_qkv_attention / norm_moe as their definitions (the
    norm, then the op; the projection, then rope; then attention), for backends that do not fuse
    them."""

    def norm_linear(self, x, residual, scale, eps, w, b):  # noqa: ANN001, ANN201 - see Ops
        h, new_residual = self.rmsnorm(x, scale, eps, residual)
        return self.linear(h, w, b), new_residual

    def norm_linear_rope(  # noqa: ANN001, ANN201 - see Ops
        self, x, residual, scale, eps, w, b, cos, sin, batch, k_cache, v_cache, config,
    ):
        qkv, new_residual = self.norm_linear(x, residual, scale, eps, w, b)  # [T, N]
        q, k, v = split_qkv(qkv, config.num_attention_heads, config.num_key_value_heads,
                            config.head_dim)
        q = self.rope_cache_write(q, k, v, cos, sin, batch, k_cache, v_cache)
        return q, new_residual

    def norm_qkv_attention(  # noqa: ANN001, ANN201 - see Ops
        self, x, residual, scale, eps, w, b, cos, sin, batch, k_cache, v_cache, sinks, window,
        attn_scale, config,
    ):
        q, new_residual = self.norm_linear_rope(x, residual, scale, eps, w, b, cos, sin, batch,
                                                k_cache, v_cache, config)  # [T, nq, d] rotated
        o = self.attention(q, k_cache, v_cache, batch, sinks, window, attn_scale)
        return o, new_residual

    def norm_moe(self, x, residual, scale, eps, layer, config):  # noqa: ANN001, ANN201
        h, new_residual = self.rmsnorm(x, scale, eps, residual)
        return self.moe(h, layer, config), new_residual


class TorchOps(NormThenOp):
    name = "torch"

    def prepare(self, weights: ModelWeights) -> None:
        pass

    def rmsnorm(self, x, scale, eps, residual):  # noqa: ANN001, ANN201 - see Ops
        return rmsnorm_ref(x, scale, eps, residual)

    def rope_cache_write(self, q, k, v, cos, sin, batch, k_cache, v_cache):  # noqa: ANN001, ANN201
        return rope_cache_write_ref(
            q, k, v, cos, sin, batch.positions, batch.slot_ids, k_cache, v_cache
        )

    def attention(self, q, k_cache, v_cache, batch, sinks, window, scale):  # noqa: ANN001, ANN201
        if batch.decode_only:
            return decode_attention_ref(
                q, k_cache, v_cache, batch.slot_ids, batch.positions, sinks, window, scale
            )
        return prefill_attention_ref(
            q, k_cache, v_cache, batch.cu_seqlens, batch.seq_slots, batch.seq_start_pos,
            sinks, window, scale,
        )

    def linear(self, x, w, b):  # noqa: ANN001, ANN201 - see Ops
        return torch.nn.functional.linear(x, w, b)

    def moe(self, x, layer, config):  # noqa: ANN001, ANN201
        return moe_ref(
            x, layer.gate_weight, layer.gate_bias,
            layer.mlp1_blocks, layer.mlp1_scales, layer.mlp1_bias,
            layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
            config.experts_per_token, config.swiglu_alpha, config.swiglu_limit,
        )
