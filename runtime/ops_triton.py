"""The Triton backend of `runtime.ops.Ops`: the fused GPU kernels of kernels/ (DESIGN §6).

Same signatures and semantics as `TorchOps` (whose torch references are these kernels' oracles).
Decode-only batches use the flash-decoding kernel, which reads only device tensors and so can be
captured in a CUDA graph; mixed/prefill batches use the varlen prefill kernel, which reads the
batch's host-side sequence lists. The MoE block calls `kernels.moe.moe_forward` (MXFP4 grouped GEMMs)
when that module is importable, else the torch reference (which syncs: not graph-capturable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from kernels.decode_attention import decode_attention
from kernels.decode_latency import serving_for
from kernels.decode_rope_attention import rope_decode_attention
from kernels.decode_variants import DecodeVariant
from kernels.dense_gemv import linear_small
from kernels.dense_gemv_norm import norm_linear_small
from kernels.dense_gemv_rope import norm_linear_rope_small
from kernels.moe_ref import moe_ref
from kernels.norm_prologue import exact_scale
from kernels.prefill_attention import prefill_attention, prefill_block_t, prefill_table
from kernels.rmsnorm import rmsnorm
from kernels.rope import rope_cache_write, split_qkv
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights, ModelWeights
from runtime.ops import NormThenOp
from runtime.ops_switches import OpsSwitches

log = logging.getLogger(__name__)

# TritonOps.warm runs the MoE at every token count up to this (the configurations and routing
# block sizes stop changing well below it), then at powers of two.
SWEEP_TOKENS = 2048
def _moe_backend() -> tuple[Callable[..., torch.Tensor] | None, Callable[..., Any] | None]:
    """(moe_forward, prepare_moe) from kernels.moe, or (None, None) when it is not there."""
    try:
        from kernels import moe
    except ImportError as exc:
        log.warning("kernels.moe unavailable (%s): the MoE block runs the torch reference", exc)
        return None, None
    return getattr(moe, "moe_forward", None), getattr(moe, "prepare_moe", None)


def _moe_norm_backend() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    try:
        from kernels import moe
    except ImportError:
        return None
    return getattr(moe, "moe_forward_norm", None)


class TritonOps(NormThenOp):
    name = "triton"

    def __init__(self, dense_gemv_rows: int | None = None, fuse_norm: bool | None = None,
                 fuse_norm_rows: int | None = None, fuse_rope: bool | None = None,
                 rope_attn: bool | None = None) -> None:
        sw = OpsSwitches.from_env(dense_gemv_rows=dense_gemv_rows, fuse_norm=fuse_norm,
                                  fuse_norm_rows=fuse_norm_rows, fuse_rope=fuse_rope,
                                  rope_attn=rope_attn)
        self.dense_gemv_rows = sw.dense_gemv_rows
        self.fuse_norm, self.fuse_norm_rows = sw.fuse_norm, sw.fuse_norm_rows
        self.fuse_rope, self.rope_attn = sw.fuse_rope, sw.rope_attn
        self._attn_window, self._attn_full = sw.attn_window, sw.attn_full
        self._moe_forward, self._prepare_moe = _moe_backend()
        self._moe_forward_norm = _moe_norm_backend()
        self._prepared: dict[int, Any] = {}  # id(layer) → the MoE kernels' weight layout
        # id(fp32 norm scale) → (that scale, an exact copy in the activation dtype) for
        # norm_linear's kernel; the scale is kept so its id is never reused for another tensor
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, weights: ModelWeights) -> None:
        if self.fuse_norm:
            for layer in weights.layers:
                narrow = exact_scale(layer.attn_norm, weights.embedding.dtype)
                if narrow is not None:
                    self._scales[id(layer.attn_norm)] = (layer.attn_norm, narrow)
        if self._prepare_moe is None:
            return
        for layer in weights.layers:
            self._prepared[id(layer)] = self._prepare_moe(layer)

    def linear(self, x, w, b):  # noqa: ANN001, ANN201 - see Ops
        if 0 < x.shape[0] <= self.dense_gemv_rows and x.dtype == w.dtype:
            return linear_small(x, w, b)
        return torch.nn.functional.linear(x, w, b)

    def rmsnorm(self, x, scale, eps, residual):  # noqa: ANN001, ANN201 - see Ops
        return rmsnorm(x, scale, eps, residual)

    def _fuses_norm(self, rows: int) -> bool:
        return self.fuse_norm and 0 < rows <= self.fuse_norm_rows

    def _norm_gemv(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether the qkv projection of x runs the dense GEMV with the norm in its prologue."""
        m = x.shape[0]
        return self._fuses_norm(m) and m <= self.dense_gemv_rows and x.dtype == w.dtype

    def _gemv_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The norm scale as the GEMV loads it best: prepare's exact copy in the activation
        dtype where there is one."""
        kept, narrow = self._scales.get(id(scale), (None, None))
        return narrow if kept is scale else scale

    def norm_linear(self, x, residual, scale, eps, w, b):  # noqa: ANN001, ANN201 - see Ops
        if self._norm_gemv(x, w):
            return norm_linear_small(x, residual, self._gemv_scale(scale), eps, w, b)
        return super().norm_linear(x, residual, scale, eps, w, b)

    def norm_linear_rope(  # noqa: ANN001, ANN201 - see Ops
        self, x, residual, scale, eps, w, b, cos, sin, batch, k_cache, v_cache, config,
    ):
        # Decode rows (eager or a decode graph's) and graph steps' rows never share a cache
        # target, which the epilogue's unordered stores need (kernels/dense_gemv_rope.py); other
        # steps take the two launches, whose rope_cache_write checks the chunks.
        if (self.fuse_rope and (batch.decode_only or batch.tile_table is not None)
                and self._norm_gemv(x, w)):
            return norm_linear_rope_small(
                x, residual, self._gemv_scale(scale), eps, w, b, cos, sin, batch.positions,
                batch.slot_ids, k_cache, v_cache, config.num_attention_heads)
        return super().norm_linear_rope(x, residual, scale, eps, w, b, cos, sin, batch, k_cache,
                                        v_cache, config)

    def norm_qkv_attention(  # noqa: ANN001, ANN201 - see Ops
        self, x, residual, scale, eps, w, b, cos, sin, batch, k_cache, v_cache, sinks, window,
        attn_scale, config,
    ):
        # Decode-only eager or decode-graph steps (one token per slot; graph padding rows on the
        # dummy slot at position 0, which read no cache) within the fused-merge kernel's rows.
        # (the config is looked up only then: the default path's attention looks it up itself)
        if (self.rope_attn and batch.decode_only and batch.tile_table is None
                and w.dtype == k_cache.dtype
                and (cfg := self._decode_variant(x.shape[0], window)) is not None):
            qkv, new_residual = self.norm_linear(x, residual, scale, eps, w, b)  # [T, N]
            q, k, v = split_qkv(qkv, config.num_attention_heads, config.num_key_value_heads,
                                config.head_dim)
            o = rope_decode_attention(q, k, v, cos, sin, k_cache, v_cache, batch.slot_ids,
                                      batch.positions, sinks, window, attn_scale, config=cfg)
            return o, new_residual
        return super().norm_qkv_attention(x, residual, scale, eps, w, b, cos, sin, batch,
                                          k_cache, v_cache, sinks, window, attn_scale, config)

    def norm_moe(self, x, residual, scale, eps, layer, config):  # noqa: ANN001, ANN201 - see Ops
        if (self._fuses_norm(x.shape[0]) and self._moe_forward is not None
                and self._moe_forward_norm is not None):
            # fused in the router's programs where that takes the batch, else the same two steps
            return self._moe_forward_norm(x, residual, scale, eps, layer, config,
                                          self._prepared.get(id(layer)))
        return super().norm_moe(x, residual, scale, eps, layer, config)

    def rope_cache_write(self, q, k, v, cos, sin, batch, k_cache, v_cache):  # noqa: ANN001, ANN201
        if not batch.decode_only and batch.tile_table is None:
            # The kernel does not order duplicate cache targets: a sequence's chunk must fit the
            # ring (the engine's max_chunk_tokens ≤ capacity guarantees it).
            if "longest" not in batch.derived:
                cu = batch.cu_seqlens
                batch.derived["longest"] = max(
                    (cu[i + 1] - cu[i] for i in range(len(cu) - 1)), default=0)
            longest = batch.derived["longest"]
            if longest > k_cache.shape[1]:
                raise ValueError(
                    f"a {longest}-token chunk exceeds the cache capacity {k_cache.shape[1]}"
                )
        return rope_cache_write(
            q, k, v, cos, sin, batch.positions, batch.slot_ids, k_cache, v_cache
        )

    def _decode_variant(self, rows: int, window: int) -> DecodeVariant | None:
        """The fused-merge decode attention (this layer kind's config) up to the batch sizes it
        was measured at, the two-launch kernels above (kernels/decode_variants.py)."""
        return serving_for(rows, window, self._attn_window, self._attn_full)

    def attention(self, q, k_cache, v_cache, batch, sinks, window, scale):  # noqa: ANN001, ANN201
        if batch.tile_table is not None:  # a graph step: every row through the prefill kernel
            return prefill_attention(q, k_cache, v_cache, [], [], [], sinks, window, scale,
                                     table=batch.tile_table)
        if batch.decode_only:
            return decode_attention(
                q, k_cache, v_cache, batch.slot_ids, batch.positions, sinks, window, scale,
                config=self._decode_variant(q.shape[0], window),
            )
        d = batch.decode_rows
        seqs = self._prefill_inputs(batch, q, k_cache, window, d)
        if d == 0:
            return prefill_attention(q, k_cache, v_cache, *seqs[:3], sinks, window, scale,
                                     table=seqs[3])
        # A mixed step: the one-token rows through the flash-decoding kernel (the prefill
        # kernel pads each of them to a 16-token tile and reads its context without a split),
        # the chunks through the prefill kernel. Rows are the first d of the packed batch.
        out = torch.empty_like(q)  # [T, nq, d]
        out[:d] = decode_attention(
            q[:d], k_cache, v_cache, batch.slot_ids[:d], batch.positions[:d], sinks, window, scale,
            config=self._decode_variant(d, window),
        )
        if d < q.shape[0]:
            out[d:] = prefill_attention(q[d:], k_cache, v_cache, *seqs[:3], sinks, window, scale,
                                        table=seqs[3])
        return out

    @staticmethod
    def _prefill_inputs(batch, q, k_cache, window, d):  # noqa: ANN001, ANN205
        """(cu_seqlens, slots, start positions, tile table) of the batch's sequences from the
        d-th on: built and checked once per step and layer kind (same cache shape and window),
        then reused by every layer."""
        key = ("prefill", tuple(k_cache.shape[:2]), window, d)
        if key not in batch.derived:
            nq, nkv = q.shape[1], k_cache.shape[2]
            cu = [c - d for c in batch.cu_seqlens[d:]]
            slots, starts = batch.seq_slots[d:], batch.seq_start_pos[d:]
            table = prefill_table(cu, slots, starts, q.shape[0] - d, k_cache.shape[0],
                                  k_cache.shape[1], window, prefill_block_t(nq, nkv), q.device)
            batch.derived[key] = (cu, slots, starts, table)
        return batch.derived[key]

    def warm(self, weights: ModelWeights,
             caches: list[tuple[torch.Tensor, torch.Tensor, int]],  # (k, v, window) per kind
             max_tokens: int, max_rows: int) -> None:
        """Compiles, before serving, every kernel variant whose choice depends on the batch size:
        the MoE (tile configuration and routing block sizes follow the token count) at every
        size up to SWEEP_TOKENS and powers of two beyond (with fuse_norm, also its router's
        norm-prologue variants up to fuse_norm_rows tokens), and the decode attention of a mixed
        step (its split count follows the row count) for 1…max_rows rows on both layer kinds.
        The batch-size arguments themselves are compiled unspecialized (kernels/jit.py). The
        dense GEMV's variants (one per padded row count 1, 2, 4, 8, with and without the norm
        prologue, which the first layer takes without a residual) are not compiled here: the
        engine's warm-up steps of 1, 2, 4, 8 tokens and its decode graph buckets compile them.
        With fuse_rope, the fused qkv + rope launch is compiled here for every decode row count
        it takes (the warm-up's prompt steps do not reach it); with rope_attn, the decode
        attention with rope, once per layer kind. The dummy cache slot is used."""
        cfg = weights.config
        layer = weights.layers[0]
        dev, dt = caches[0][0].device, caches[0][0].dtype
        sizes = list(range(1, min(max_tokens, SWEEP_TOKENS) + 1))
        n = SWEEP_TOKENS * 2
        while n < max_tokens:
            sizes.append(n)
            n *= 2
        if max_tokens > SWEEP_TOKENS:
            sizes.append(max_tokens)
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(max(sizes), cfg.hidden_size, device=dev, generator=g).to(dt)
        for t in sizes:
            self.moe(x[:t], layer, cfg)
            if self._fuses_norm(t):  # the router's norm-prologue variants too
                self.norm_moe(x[:t], x[:t], layer.mlp_norm, cfg.rms_norm_eps, layer, cfg)
        q = torch.zeros(max_rows, cfg.num_attention_heads, cfg.head_dim, device=dev, dtype=dt)
        positions = torch.zeros(max_rows, device=dev, dtype=torch.long)
        if self.fuse_rope:
            self._warm_rope(layer, cfg, caches[0][0], caches[0][1], x, max_rows)
        for k_cache, v_cache, window in caches:
            slots = torch.full((max_rows,), k_cache.shape[0] - 1, device=dev, dtype=torch.long)
            for rows in range(1, max_rows + 1):
                decode_attention(q[:rows], k_cache, v_cache, slots[:rows], positions[:rows],
                                 layer.sinks, window, cfg.head_dim**-0.5,
                                 config=self._decode_variant(rows, window))
            if self.rope_attn and self._decode_variant(1, window) is not None:
                # one compiled variant per layer kind: the row count is only the grid's
                qkv = torch.zeros(1, layer.qkv_weight.shape[0], device=dev, dtype=dt)
                table = torch.zeros(1, cfg.head_dim // 2, device=dev)  # position 0 only
                rope_decode_attention(
                    *split_qkv(qkv, cfg.num_attention_heads, cfg.num_key_value_heads,
                               cfg.head_dim), table, table, k_cache, v_cache, slots[:1],
                    positions[:1], layer.sinks, window, cfg.head_dim**-0.5,
                    config=self._decode_variant(1, window))

    def _warm_rope(self, layer: LayerWeights, cfg: ModelConfig, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, x: torch.Tensor, max_rows: int) -> None:
        """norm_linear_rope_small at each row count it serves, with and without a residual (the
        first layer), writing the dummy slot at position 0."""
        dev = x.device
        table = torch.zeros(1, cfg.head_dim // 2, device=dev)  # [1, d/2]: position 0 only
        slots = torch.full((max_rows,), k_cache.shape[0] - 1, device=dev, dtype=torch.long)
        positions = torch.zeros(max_rows, device=dev, dtype=torch.long)
        for rows in range(1, max_rows + 1):
            if not self._norm_gemv(x[:rows], layer.qkv_weight):
                continue
            for residual in (None, x[:rows]):
                norm_linear_rope_small(
                    x[:rows], residual, self._gemv_scale(layer.attn_norm), cfg.rms_norm_eps,
                    layer.qkv_weight, layer.qkv_bias, table, table, positions[:rows],
                    slots[:rows], k_cache, v_cache, cfg.num_attention_heads)

    def moe(self, x: torch.Tensor, layer: LayerWeights, config: ModelConfig) -> torch.Tensor:
        if self._moe_forward is not None:
            prepared = self._prepared.get(id(layer))
            return self._moe_forward(x, layer, config, prepared)
        return moe_ref(
            x, layer.gate_weight, layer.gate_bias,
            layer.mlp1_blocks, layer.mlp1_scales, layer.mlp1_bias,
            layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
            config.experts_per_token, config.swiglu_alpha, config.swiglu_limit,
        )
