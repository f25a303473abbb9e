"""The gpt-oss MoE layer on the GPU: router, routing, two MXFP4 grouped GEMMs and the combine.

    logits = x·Wgᵀ + bg                                   torch linear (cuBLAS), as in moe_ref
    plan   = route(logits, k)                             kernels/moe_routing_par.py
    act    = swiglu(x[token]·W1[e]ᵀ + b1[e])              kernels/moe_gemm.py, rows in expert order
    y      = (act·W2[e]ᵀ + b2[e]) · w                     same, scaled by the router weight
    out[t] = Σⱼ y[pos(t, j)]                              deterministic gather-reduce
Same math as kernels/moe_ref.moe_ref (the oracle). Five launches, no host sync, sizes fixed by
(T, k, E): the whole layer can be captured in a CUDA graph. moe_forward_norm also takes the
norm before the block (rmsnorm with its residual add), in the router's programs for decode
batches (kernels/norm_prologue.py).

Tile shapes depend on how many rows each expert gets: decode (a few tokens per expert) streams
every hit expert's weights once, spread over many programs along N (SWAP_AB puts the weight rows
on the MMA's M side); prefill (many tokens per expert) uses large tensor-core tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.moe_configs import (
    DECODE,
    DECODE_FEW,
    DECODE_WIDE,
    GEMV,
    MIDDLE,
    PREFILL,
    PREFILL_PF,
    TILES_32,
    MoEConfig,
    choose_config,
)
from kernels.moe_gemm import combine, gemm1_swiglu, gemm2_scale
from kernels.moe_gemv import GEMV_MAX_SCALE, moe_gemv, presplit_dtype
from kernels.moe_gemv_scales import scale_words as gemv_scale_words
from kernels.moe_ref import moe_ref
from kernels.moe_router import fits, norm_fits, route_fused
from kernels.moe_routing import RoutingPlan, route
from kernels.moe_routing_par import route_par
from kernels.norm_prologue import norm_prologue
from kernels.rmsnorm import rmsnorm
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights


@dataclass(frozen=True)
class MoEPrepared:
    """One layer's expert weights in the layout the kernels read (codes viewed, exponents
    groups-major)."""

    w1: torch.Tensor  # [E, 2I, H/2] u8 codes, gate/linear rows interleaved
    s1: torch.Tensor  # [E, 2I, H/32] u8 exponents, [E, H/32, 2I] storage (groups_major)
    b1: torch.Tensor  # [E, 2I] fp32
    w2: torch.Tensor  # [E, H, I/2] u8
    s2: torch.Tensor  # [E, H, I/32] u8, [E, I/32, H] storage
    b2: torch.Tensor  # [E, H] fp32
    fast_ok: bool = True  # every scale byte ≤ 136: the fp16 fast path is exact (kernels/moe_dequant)
    gemv_ok: bool = True  # every scale byte ≤ 240: the GEMV path is exact (kernels/moe_gemv)
    # code rows 16-byte aligned (K a multiple of 32): the tiles' prefetch and 16-byte loads apply
    aligned: bool = True
    # GEMM 2's per-N-block arrival counters for the fused combine; kernels leave them at zero.
    counters: torch.Tensor | None = None
    # The exponents as int32 words of 4 groups (kernels/moe_gemv_scales.py), for GEMV tiles with
    # scale_words; built only when asked (prepare_moe(..., scale_words=True)).
    sw1: torch.Tensor | None = None  # [E, 2I, ⌈H/128⌉] int32, [E, ⌈H/128⌉, 2I] storage
    sw2: torch.Tensor | None = None  # [E, H, ⌈I/128⌉] int32


FAST_MAX_SCALE = 136
ROUTES = {"par": route_par, "seq": route}  # MoEConfig.routing → the routing launcher
COUNTERS = 1024  # ≥ H / block_n of any config


def _mxfp4_view(blocks: torch.Tensor, scales: torch.Tensor, name: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != 16:
        raise ValueError(f"{name}: expected u8 blocks [E, N, K/32, 16] and u8 scales, got "
                         f"{blocks.dtype} {tuple(blocks.shape)} / {scales.dtype}")
    e, n, g, _ = blocks.shape
    return blocks.contiguous().view(e, n, g * 16), groups_major(scales)


def groups_major(scales: torch.Tensor) -> torch.Tensor:
    """[E, N, G] exponents with [E, G, N] storage (a view with the same values): one k-step's
    exponents of a block of rows are then contiguous, so they stream through cp.async with the
    codes instead of as byte loads that stall every k-step on a DRAM round trip."""
    if scales.stride(1) == 1:
        return scales
    return scales.transpose(1, 2).contiguous().transpose(1, 2)


def prepare_moe(layer: LayerWeights, check_scales: bool = True,
                relayout_layer: bool = True, scale_words: bool = False) -> MoEPrepared:
    """Called once at load. Codes stay in the checkpoint layout (each output row's K/2 bytes
    contiguous: what the kernels read best) and are only viewed; exponents are re-laid out
    groups-major (groups_major). relayout_layer: the layer's own mlp*_scales become those
    views too (same values, other strides), so no second copy stays alive.
    check_scales: one host sync to rule out weights the fp16 fast path cannot hold (|w| ≥ 2¹⁰);
    without it (e.g. inside a CUDA graph capture) the fast path is assumed safe.
    scale_words: also the exponents as words (GemvTiles.scale_words; 1/32 of the codes more)."""
    w1, s1 = _mxfp4_view(layer.mlp1_blocks, layer.mlp1_scales, "mlp1")
    w2, s2 = _mxfp4_view(layer.mlp2_blocks, layer.mlp2_scales, "mlp2")
    if relayout_layer:
        layer.mlp1_scales, layer.mlp2_scales = s1, s2
    fast_ok = gemv_ok = True
    if check_scales and s1.numel():
        top = max(int(s1.max()), int(s2.max()))
        fast_ok, gemv_ok = top <= FAST_MAX_SCALE, top <= GEMV_MAX_SCALE
    return MoEPrepared(
        w1=w1, s1=s1, b1=layer.mlp1_bias.float().contiguous(),
        w2=w2, s2=s2, b2=layer.mlp2_bias.float().contiguous(), fast_ok=fast_ok,
        gemv_ok=gemv_ok,
        aligned=all(w.data_ptr() % 16 == 0 and w.stride(0) % 16 == 0 and w.stride(1) % 16 == 0
                    for w in (w1, w2)),
        counters=torch.zeros(COUNTERS, dtype=torch.int32, device=w1.device),
        sw1=gemv_scale_words(s1) if scale_words else None,
        sw2=gemv_scale_words(s2) if scale_words else None,
    )


def router_logits(x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    """[T, E] in x's dtype, exactly as kernels/moe_ref.route_ref computes them."""
    return torch.nn.functional.linear(
        x, layer.gate_weight.to(x.dtype), layer.gate_bias.to(x.dtype)
    )


def moe_experts(x: torch.Tensor, plan: RoutingPlan, prepared: MoEPrepared, top_k: int,
                cfg: MoEConfig, alpha: float = 1.702, limit: float = 7.0,
                xs: torch.Tensor | None = None) -> torch.Tensor:
    """The experts of a routed batch: x [T, H] → [T, H] (kernels/moe_ref.experts_ref). xs: x
    already pre-split for the GEMV path (route_fused's xs_out), or None."""
    p = prepared
    if cfg.gemv is not None and p.gemv_ok:
        words = None if p.sw1 is None or p.sw2 is None else (p.sw1, p.sw2)
        return moe_gemv(x, plan.experts, plan.weights, p.w1, p.s1, p.b1, p.w2, p.s2, p.b2,
                        cfg.gemv, alpha, limit, counters=p.counters, xs=xs, scale_words=words)
    fast = cfg.fast and p.fast_ok and x.dtype in (torch.float16, torch.bfloat16)
    pdl = cfg.pdl
    act = gemm1_swiglu(x, p.w1, p.s1, p.b1, plan, top_k, alpha, limit, cfg.gemm1, fast, pdl)
    if cfg.fuses_combine(x.shape[0]) and p.counters is not None:
        out = torch.empty_like(x)
        gemm2_scale(act, p.w2, p.s2, p.b2, plan, cfg.gemm2, fast, x.dtype, out, p.counters,
                    top_k, pdl)
        return out
    y = gemm2_scale(act, p.w2, p.s2, p.b2, plan, cfg.gemm2, fast, x.dtype, pdl=pdl)
    return combine(y, plan, top_k, x.dtype, pdl)  # y: [S, T·k, H]


def moe_forward(
    x: torch.Tensor,  # [T, H] normalized activations
    layer: LayerWeights,
    config: ModelConfig,
    prepared: MoEPrepared | None = None,
    moe_config: MoEConfig | None = None,
) -> torch.Tensor:
    """The MoE block's output [T, H] (before the residual add), in x's dtype."""
    p, cfg = _setup(x, layer, config, prepared, moe_config, "moe_forward")
    k = config.experts_per_token
    x = x.contiguous()
    xs = None
    if cfg.fused_router and p.counters is not None and fits(x.shape[0], k, config.num_experts):
        xs = _xs_buffer(x, p, cfg)
        plan = route_fused(x, layer.gate_weight.to(x.dtype).contiguous(),
                           layer.gate_bias.to(x.dtype), k, cfg.block_m, p.counters[-1:], xs,
                           fast_one=cfg.router_fast_one)
    else:
        plan = ROUTES[cfg.routing](router_logits(x, layer), k, cfg.block_m, cfg.pdl)
    return moe_experts(x, plan, p, k, cfg, config.swiglu_alpha, config.swiglu_limit, xs)


def moe_forward_norm(
    delta: torch.Tensor,  # [T, H] the attention block's output (un-normed)
    residual: torch.Tensor | None,  # [T, H] the residual stream so far; None: delta is it
    scale: torch.Tensor,  # [H] fp32 the MLP norm's scale
    eps: float,
    layer: LayerWeights,
    config: ModelConfig,
    prepared: MoEPrepared | None = None,
    moe_config: MoEConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.rmsnorm.rmsnorm(delta, scale, eps, residual) then moe_forward: (the MoE block's
    output [T, H], the new residual stream [T, H]). Where the fused router takes the batch with
    its norm prologue (decode: kernels/moe_router.norm_fits) the norm runs in the router's
    programs, which also write the normed x for the experts (one launch fewer); otherwise the
    standalone norm, then moe_forward. The same bits either way (interpreted; compiled, up to
    the order of the norm's sum of squares, kernels/norm_prologue.py)."""
    p, cfg = _setup(delta, layer, config, prepared, moe_config, "moe_forward_norm")
    k = config.experts_per_token
    t = delta.shape[0]
    if not (cfg.fused_router and p.counters is not None and norm_fits(t, k, config.num_experts)):
        x, new_residual = rmsnorm(delta, scale, eps, residual)
        return moe_forward(x, layer, config, p, moe_config), new_residual
    delta = delta.contiguous()
    norm = norm_prologue(delta, residual, scale, eps)
    x = torch.empty_like(delta)  # the normed activations, written by the router
    xs = _xs_buffer(delta, p, cfg)
    plan = route_fused(delta, layer.gate_weight.to(delta.dtype).contiguous(),
                       layer.gate_bias.to(delta.dtype), k, cfg.block_m, p.counters[-1:], xs,
                       norm=norm, y_out=x, fast_one=cfg.router_fast_one)
    out = moe_experts(x, plan, p, k, cfg, config.swiglu_alpha, config.swiglu_limit, xs)
    return out, norm.new_residual(delta)


def _setup(x: torch.Tensor, layer: LayerWeights, config: ModelConfig,
           prepared: MoEPrepared | None, moe_config: MoEConfig | None, who: str
           ) -> tuple[MoEPrepared, MoEConfig]:
    """The layer's prepared weights and the MoE config for x [T, H]."""
    if x.dim() != 2 or x.shape[1] != config.hidden_size:
        raise ValueError(f"{who}: x must be [T, {config.hidden_size}], got {tuple(x.shape)}")
    cfg = moe_config or choose_config(x.shape[0], config.experts_per_token, config.num_experts)
    if prepared is None:  # prepare at load instead: this copies the exponents on every call
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        words = cfg.gemv is not None and (cfg.gemv.gemm1.scale_words or cfg.gemv.gemm2.scale_words)
        prepared = prepare_moe(layer, check_scales=not capturing, relayout_layer=False,
                               scale_words=words)
    if cfg.gemv is None and cfg.block_m > 32 and x.dtype == torch.float32 and x.is_cuda:
        # fp32 activations double the larger tiles' shared memory, past the H100's 227 KB for
        # the k256 tiles (273 KB measured); the 32-row tiles were measured to fit.
        cfg = TILES_32
    if not prepared.aligned:  # codes viewed at an odd offset: the same tiles, plain loads
        cfg = without_latency_options(cfg)
    return prepared, cfg


def _xs_buffer(x: torch.Tensor, p: MoEPrepared, cfg: MoEConfig) -> torch.Tensor | None:
    """The buffer the fused router writes the GEMV's pre-split x into, when the GEMV path reads
    one (None: the experts read x itself)."""
    xs_dtype = presplit_dtype(cfg.gemv, x.dtype) if cfg.gemv and p.gemv_ok else None
    if xs_dtype is None or x.shape[1] % 32:
        return None
    return torch.empty(x.shape, dtype=xs_dtype, device=x.device)


def without_latency_options(cfg: MoEConfig) -> MoEConfig:
    plain = {"prefetch": 0, "wide_loads": False}
    return replace(cfg, gemm1=replace(cfg.gemm1, **plain), gemm2=replace(cfg.gemm2, **plain))


def moe_forward_ref(x: torch.Tensor, layer: LayerWeights, config: ModelConfig) -> torch.Tensor:
    """The oracle, with moe_forward's signature."""
    return moe_ref(
        x, layer.gate_weight, layer.gate_bias, layer.mlp1_blocks, layer.mlp1_scales,
        layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
        config.experts_per_token, config.swiglu_alpha, config.swiglu_limit,
    )


__all__ = ["DECODE", "DECODE_FEW", "DECODE_WIDE", "GEMV", "MIDDLE", "PREFILL", "PREFILL_PF",
           "MoEConfig", "MoEPrepared",
           "choose_config", "groups_major", "moe_experts", "moe_forward", "moe_forward_norm",
           "moe_forward_ref",
           "prepare_moe", "router_logits"]
