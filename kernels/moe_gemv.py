"""Small-batch MoE on MXFP4 weights: one GEMV per (token, expert) pair, no tensor cores.

For a few tokens the layer is a pure weight stream (13.2 MB per hit expert of gpt-oss); the tile
GEMMs (kernels/moe_gemm.py) walked K in long dependent loops over a few hundred programs and sat
at ~6× the bandwidth roofline whatever the tile. Here every (pair p = t·k + j, block of BLOCK_N
weight rows[, K split]) is its own short program: ~1000+ programs at one token, each streaming
[BLOCK_N, BLOCK_K/2] code bytes per step with 16-byte loads (one MXFP4 group per thread).

    GEMM 1:  h[p] = round_x(x[t]·W1[e]ᵀ) + b1[e];  act[p] = round_x(swiglu(h[0::2], h[1::2]))
    GEMM 2:  part[s, p] = act[p, K_s]·W2[e, :, K_s]ᵀ                                    fp32
    combine: out[t] = Σ_j w[t, j]·(round_x(Σ_s part[s, t·k + j]) + b2[e_tj])           x's dtype
(round_x: rounded to x's dtype, as torch's matmul is in kernels/moe_ref.py.) Fixed-order sums:
deterministic. Grids depend on (T, k, shapes) only, experts are read on the device from the
routing's [T, k] table: capturable in a CUDA graph.

Dequantization without a table: code c → fp16 bits ((c & 8) << 12) | ((c & 7) << 9) is exactly
fp4(c)·2⁻¹⁴ (fp16 subnormals line up with e2m1's), widened to fp32 and multiplied by x; the
group's 2^(s − 127)·2¹⁴ = 2^(s − 113) (fp32 bits (s + 14) << 23) multiplies the group's partial
sum, not each element. Exact for every scale byte ≤ 240 (|w| ≤ 6·2¹¹³); prepare_moe's
`gemv_ok` sends anything else to the tile path's exact dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels import pdl
from kernels.moe_gemm import compiled
from kernels.moe_gemv_dequant import F16, F32
from kernels.moe_gemv_fence import PF_FENCE
from kernels.moe_gemv_kernels import GEMV_MAX_SCALE, jit
from kernels.moe_gemv_pipe import PF_ASYNC
from kernels.moe_gemv_split import SPLIT_K1_MAX

# The Triton functions live in kernels/moe_gemv_kernels.py; `jit` is their KernelSet.
__all__ = ["GEMV_MAX_SCALE", "GemvConfig", "GemvTiles", "gemv1_swiglu", "jit", "moe_gemv",
           "presplit", "presplit_dtype"]


# ---- launchers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvTiles:
    """One GEMV launch: BLOCK_N weight rows per program (GEMM 1: interleaved gate/linear rows,
    even), BLOCK_K per step (≥ 32, a power of two), K split over SPLIT_K programs (GEMM 2).
    dequant: "exact" (nibble by nibble), "f32" or "f16" (the fast step, kernels/moe_gemv_dequant;
    "f16" multiplies in fp16 and is used only for fp16/bf16 activations, "f32" otherwise).
    prefetch: 0 (today's loop) or 1/2: the fast step's loads that many steps ahead of their math
    in registers; async_copy: the loop through Triton's cp.async pipeliner, num_stages buffers
    (kernels/moe_gemv_pipe.py; both give today's bits). scale_words: the fast step reads the
    exponents as int32 words of 4 groups (kernels/moe_gemv_scales.py; moe_gemv's scale_words),
    issued before the step's codes in the PTX: the same bits. loads_first (f16 only, no
    prefetch): every load of a step issued before its first math (kernels/moe_gemv_fence.py;
    the same bits as "f16")."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    dequant: str = "exact"
    prefetch: int = 0
    async_copy: bool = False
    scale_words: bool = False
    loads_first: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvTiles.{name} must be a power of two, got {v}")
        if self.block_n < 2 or self.block_k < 32 or self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"GemvTiles: block_n ≥ 2, block_k ≥ 32, stages/split ≥ 1: {self}")
        if self.dequant not in _DEQ:
            raise ValueError(f"GemvTiles.dequant must be one of {sorted(_DEQ)}: {self}")
        if (self.prefetch not in (0, 1, 2) or (self.prefetch and self.async_copy)
                or ((self.prefetch or self.async_copy) and self.dequant == "exact")):
            raise ValueError(f"GemvTiles: prefetch 0, 1 or 2 or async_copy, only for the fast "
                             f"steps: {self}")
        if self.scale_words and self.dequant == "exact":
            raise ValueError(f"GemvTiles: scale_words only for the fast steps: {self}")
        if self.loads_first and (self.dequant != "f16" or self.prefetch or self.async_copy):
            raise ValueError(f"GemvTiles: loads_first only for the f16 step, without prefetch "
                             f"or async_copy: {self}")


@dataclass(frozen=True)
class GemvConfig:
    gemm1: GemvTiles
    gemm2: GemvTiles
    # GEMM 2's last program per N block sums the block for every token (kernels/moe_gemv_pipe):
    # no combine launch, same bits. Uses moe_gemv's `counters` (zeros, left at zero).
    fuse_combine: bool = False
    # GEMM 1's K over this many programs per row block, summed + swiglu in a second launch
    # (kernels/moe_gemv_split.py): deterministic, other fp32 sums than 1 (today's one launch).
    split_k1: int = 1

    def __post_init__(self) -> None:
        if (not isinstance(self.split_k1, int) or isinstance(self.split_k1, bool)
                or not 1 <= self.split_k1 <= SPLIT_K1_MAX):
            raise ValueError(f"GemvConfig.split_k1 must be an int in 1…{SPLIT_K1_MAX}, got "
                             f"{self.split_k1!r}")


_DEQ = {"exact": 0, "f32": F32.value, "f16": F16.value}


def _deq(cfg: GemvConfig, dtype: torch.dtype) -> int:
    """One mode for both GEMMs (GEMM 1 stores act in the layout GEMM 2 reads): fp16 math only for
    fp16/bf16 activations."""
    deq = _DEQ[cfg.gemm1.dequant]
    if deq == F16 and dtype == torch.float32:
        deq = F32.value
    return deq


def presplit_dtype(cfg: GemvConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the pre-split x that moe_gemv reads for activations of `dtype` (None: the
    exact step reads x itself)."""
    deq = _deq(cfg, dtype)
    return {0: None, F32.value: torch.float32, F16.value: torch.float16}[deq]


def _launch(tiles: GemvTiles, deq: int, device: torch.device) -> dict:
    pf = PF_ASYNC.value if tiles.async_copy else tiles.prefetch
    pf = PF_FENCE.value if tiles.loads_first else pf
    extra = {"PREFETCH": pf} if pf else {}  # today's launch otherwise
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, DEQ=deq,
                EMULATE=not compiled(device), **extra)  # the interpreter cannot run PTX


def _words(w: torch.Tensor) -> torch.Tensor:
    """Codes [E, N, K/2] u8 as int32 words [E, N, K/8] (a view): the f16 step loads each group's
    4 words as one 16-byte vector, so every row must start 16-byte aligned."""
    if w.stride(-1) != 1 or w.data_ptr() % 16 or any(st % 16 for st in w.stride()[:-1]):
        raise ValueError(f"moe_gemv: f16 dequant needs 16-byte aligned code rows: strides "
                         f"{w.stride()}, address {w.data_ptr():#x}")
    return w.view(torch.int32)


def presplit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, K] → [T, K] in dtype, each group of 32 reordered as its 16 even k, then its 16 odd k
    (the fast step's x; one copy kernel)."""
    t, k = x.shape
    out = torch.empty(t, k // 32, 2, 16, dtype=dtype, device=x.device)
    out.copy_(x.unflatten(1, (k // 32, 16, 2)).transpose(2, 3))
    return out.view(t, k)


def moe_gemv(
    x: torch.Tensor,  # [T, H] activations
    experts: torch.Tensor,  # [T, k] int32 expert ids (the routing's)
    weights: torch.Tensor,  # [T, k] fp32 router weights
    w1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor,  # [E, 2I, H/2] u8, [E, 2I, H/32], [E, 2I]
    w2: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor,  # [E, H, I/2] u8, [E, H, I/32], [E, H]
    cfg: GemvConfig, alpha: float = 1.702, limit: float = 7.0,
    counters: torch.Tensor | None = None,  # [≥ H / block_n] int32 zeros (cfg.fuse_combine)
    xs: torch.Tensor | None = None,  # [T, H] x already pre-split in the fast step's math dtype
    scale_words: tuple[torch.Tensor, torch.Tensor] | None = None,  # scale_words(s1), (s2)
) -> torch.Tensor:
    """The experts of a routed batch by GEMVs: → [T, H] in x's dtype (kernels/moe_ref.experts_ref).
    Three launches (GEMM 1 + swiglu, GEMM 2 partials, combine; two with cfg.fuse_combine, one
    more with cfg.split_k1 > 1), grids fixed by (T, k, shapes). counters: the fused combine's
    arrival counters, left at zero (e.g. prepare_moe's; its last entry, the fused router's, is
    not used); None: a zeroed buffer per device kept here (one stream at a time).
    xs: presplit(x, math dtype) when the caller has it already (the fused router writes it,
    kernels/moe_router.route_fused); ignored by the exact step, which reads x itself.
    scale_words: (scale_words(s1), scale_words(s2)) (kernels/moe_gemv_scales.py), read instead
    of s1 / s2 by the GEMMs whose tiles ask for them (GemvTiles.scale_words)."""
    t, h = x.shape
    top_k = experts.shape[1]
    n2, inter = w1.shape[1], w2.shape[2] * 2
    if (x.stride(1) != 1 or experts.shape != (t, top_k) or weights.shape != (t, top_k)
            or w1.shape[2] * 2 != h or w2.shape[1] != h or n2 != 2 * inter or h % 32 or inter % 32):
        raise ValueError(f"moe_gemv: shapes x {tuple(x.shape)}, experts {tuple(experts.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} disagree")
    if w1.stride(1) % 16 or w2.stride(1) % 16 or w1.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError(f"moe_gemv: code rows must be contiguous with 16-byte strides, got "
                         f"{w1.stride()}, {w2.stride()}")
    if cfg.gemm1.block_n % 2:
        raise ValueError("moe_gemv: GEMM 1 needs an even block_n (gate/linear pairs)")
    if cfg.gemm1.dequant != cfg.gemm2.dequant:
        raise ValueError("moe_gemv: both GEMMs need the same dequant (act's layout depends on it)")
    s1, s2 = _scales(cfg, s1, s2, scale_words)
    out = torch.empty_like(x)
    pairs = t * top_k
    if pairs == 0:
        return out
    ex = experts.contiguous().view(-1).to(torch.int32)
    wt = weights.contiguous().view(-1).float()
    deq = _deq(cfg, x.dtype)
    math_dtype = presplit_dtype(cfg, x.dtype) or x.dtype  # the fast steps' x and act dtype
    if deq == 0:
        xs = x
    elif xs is None:
        xs = presplit(x, math_dtype)
    elif xs.shape != x.shape or xs.dtype != math_dtype or not xs.is_contiguous():
        raise ValueError(f"moe_gemv: xs must be contiguous {math_dtype} {tuple(x.shape)}, got "
                         f"{xs.dtype} {tuple(xs.shape)}")
    act = torch.empty(pairs, inter, dtype=math_dtype, device=x.device)
    a_in = act
    if deq == F16.value:  # codes read as int32 words, x and act as int64 (4 fp16 each)
        w1, w2, xs, a_in = _words(w1), _words(w2), xs.view(torch.int64), act.view(torch.int64)
    gemv1_swiglu(x, xs, ex, w1, s1, b1, act, top_k, cfg.gemm1, deq, alpha, limit,
                 split=cfg.split_k1 if cfg.split_k1 > 1 else None)
    g2 = cfg.gemm2
    split = g2.split_k
    k_per_split = triton.cdiv(inter // 32, split) * 32
    part = torch.empty(split, pairs, h, dtype=torch.float32, device=x.device)
    n_blocks = triton.cdiv(h, g2.block_n)
    if cfg.fuse_combine:
        cnt = _counters(counters, n_blocks, x.device)
        jit["_gemv2_fused_kernel"][(pairs * split * n_blocks,)](
            a_in, a_in.stride(0), w2, w2.stride(0), w2.stride(1), s2, s2.stride(0), s2.stride(1),
            s2.stride(2), ex, part, part.stride(0), part.stride(1), h, inter, pairs, k_per_split,
            wt, b2, b2.stride(0), out, out.stride(0), cnt,
            TOPK=top_k, SPLIT_K=split, **{"PREFETCH": 0, **_launch(g2, deq, x.device)},
            **pdl.launch_args(x.device),
        )
        return out
    jit["_gemv2_kernel"][(pairs * split * n_blocks,)](
        a_in, a_in.stride(0), w2, w2.stride(0), w2.stride(1), s2, s2.stride(0), s2.stride(1),
        s2.stride(2), ex, part, part.stride(0), part.stride(1), h, inter, pairs, k_per_split,
        SPLIT_K=split, **_launch(g2, deq, x.device),
        **pdl.launch_args(x.device, row_bytes=k_per_split // 2),
    )
    # 128 columns per one-warp program: 23 programs per token of 20b. (1024-column programs
    # left 3 programs for one token: 4.2 µs on the H100, latency of a nearly idle GPU.)
    block_h = min(128, triton.next_power_of_2(h))
    jit["_gemv_combine_kernel"][(t, triton.cdiv(h, block_h))](
        part, part.stride(0), part.stride(1), ex, wt, b2, b2.stride(0), out, out.stride(0), h,
        TOPK=top_k, SPLIT_K=split, BLOCK_H=block_h, num_warps=1, **pdl.launch_args(x.device),
    )
    return out


def gemv1_swiglu(
    x: torch.Tensor, xs: torch.Tensor, ex: torch.Tensor,  # [T, H]; as read (moe_gemv); [T·k]
    w1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor, act: torch.Tensor,  # act: [T·k, I]
    top_k: int, tiles: GemvTiles, deq: int, alpha: float, limit: float, split: int | None,
) -> None:
    """GEMM 1 + bias + swiglu into act, as moe_gemv prepares the operands: one launch (split
    None), or K split over `split` programs per row block then the sum + swiglu launch
    (kernels/moe_gemv_split.py; split = 1 there gives the one launch's bits)."""
    pairs, n2, h = act.shape[0], w1.shape[1], x.shape[1]
    w_args = (w1, w1.stride(0), w1.stride(1), s1, s1.stride(0), s1.stride(1), s1.stride(2))
    grid = pairs * triton.cdiv(n2, tiles.block_n)
    if split is None:
        jit["_gemv1_swiglu_kernel"][(grid,)](
            x, xs, xs.stride(0), *w_args, b1, b1.stride(0), ex, act, act.stride(0), n2, h, pairs,
            float(alpha), float(limit), TOPK=top_k, **_launch(tiles, deq, x.device),
            **pdl.launch_args(x.device))
        return
    part = torch.empty(split, pairs, n2, dtype=torch.float32, device=x.device)
    jit["_gemv1_part_kernel"][(grid * split,)](
        xs, xs.stride(0), *w_args, ex, part, part.stride(0), part.stride(1), n2, h, pairs,
        triton.cdiv(h // 32, split) * 32, TOPK=top_k, SPLIT_K=split,
        **_launch(tiles, deq, x.device))
    block_c = min(256, triton.next_power_of_2(n2 // 2))  # 48 programs per 20b token
    jit["_swiglu_sum_kernel"][(pairs * triton.cdiv(n2 // 2, block_c),)](
        x, part, part.stride(0), part.stride(1), ex, b1, b1.stride(0), act, act.stride(0), n2,
        pairs, float(alpha), float(limit), SPLIT_K=split, BLOCK_C=block_c, DEQ=deq, num_warps=4)


def _scales(cfg: GemvConfig, s1: torch.Tensor, s2: torch.Tensor,
            words: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponents each GEMM reads: its bytes, or its words where its tiles ask for them (the
    kernels tell the two apart by dtype)."""
    if not (cfg.gemm1.scale_words or cfg.gemm2.scale_words):
        return s1, s2
    if words is None:
        raise ValueError("moe_gemv: these tiles read scale words: pass scale_words= "
                         "(prepare_moe(..., scale_words=True) builds them)")
    out = []
    for tiles, s, w in ((cfg.gemm1, s1, words[0]), (cfg.gemm2, s2, words[1])):
        g4 = -(-s.shape[2] // 4)
        if w.dtype != torch.int32 or tuple(w.shape) != (*s.shape[:2], g4) or w.stride(1) != 1:
            raise ValueError(f"moe_gemv: scale words must be int32 {(*s.shape[:2], g4)} "
                             f"words-major (kernels/moe_gemv_scales.py), got {w.dtype} "
                             f"{tuple(w.shape)} strides {w.stride()}")
        out.append(w if tiles.scale_words else s)
    return out[0], out[1]


_OWN_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(given: torch.Tensor | None, n_blocks: int, device: torch.device) -> torch.Tensor:
    """n_blocks arrival counters (zeros; the kernel leaves them at zero)."""
    if given is None:
        given = _OWN_COUNTERS.get(device)
        if given is None or given.numel() < n_blocks:
            given = _OWN_COUNTERS[device] = torch.zeros(max(n_blocks, 1024), dtype=torch.int32,
                                                        device=device)
        return given
    if given.dtype != torch.int32 or given.numel() < n_blocks + 1 or given.device != device:
        raise ValueError(f"moe_gemv: fuse_combine needs > {n_blocks} int32 counters on {device}, "
                         f"got {given.numel()} {given.dtype} on {given.device}")
    return given[:n_blocks]
