"""Decode attention: one query token per slot over that slot's cache, GQA, sinks, sliding window.

Row b is the query of slot slot_ids[b] at position positions[b]; the cache already holds positions
0 … positions[b] of that slot (index i mod C). Same math as prefill_attention (see there):
    o = Σᵢ exp(sᵢ − m) vᵢ / (exp(sink − m) + Σᵢ exp(sᵢ − m)),  i ∈ [lo(p), p]
The kernel reads only positions up to each slot's own length and splits long contexts across
programs, merging partial softmaxes (flash-decoding, https://pytorch.org/blog/flash-decoding/).

Triton kernel: grid (B, nkv, splits), one program per (row, KV head, split), all G = nq/nkv query
heads of the KV head together (a [G, d] × [d, BLOCK_N] tensor-core product per key block), so each
key/value block is read once. Split s of a row owns key blocks [s·bps, (s+1)·bps) of that row's own
range [lo(p), p] with bps = ⌈blocks/splits⌉: programs past a row's length return at once, so the
work follows each slot's length while the grid depends only on shapes (CUDA-graph capturable, no
host sync). With more than one split, each program writes (m, ℓ, acc) in base 2 and a merge kernel
combines them with the sink:
    M = max(sink, maxₛ mₛ);  o = Σₛ 2^(mₛ−M) accₛ / (2^(sink−M) + Σₛ 2^(mₛ−M) ℓₛ)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.decode_variants import DecodeVariant, _online_softmax, launch_fused
from kernels.jit import KernelSet
from kernels.prefill_attention import attention_core_ref, cached_positions

jit = KernelSet(globals())
jit(_online_softmax)  # decode_variants' helper, compiled or interpreted with this set
LOG2E = 1.4426950408889634
MAX_SPLITS = 64


def decode_attention_ref(
    q: torch.Tensor,  # [B, nq, d] (rotated)
    k_cache: torch.Tensor,  # [S+1, C, nkv, d]
    v_cache: torch.Tensor,  # [S+1, C, nkv, d]
    slot_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    sinks: torch.Tensor,  # [nq] fp32
    window: int,  # 0 = full causal
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cap = k_cache.shape[1]
    for b in range(q.shape[0]):
        slot, pos = int(slot_ids[b]), int(positions[b])
        kpos = cached_positions(cap, pos, q.device)
        qpos = torch.tensor([pos], device=q.device)
        out[b : b + 1] = attention_core_ref(
            q[b : b + 1], k_cache[slot], v_cache[slot], qpos, kpos, sinks, window, scale
        )
    return out


@jit
def _decode_kernel(
    Q, KC, VC, SLOT, POS, SINK, OUT, PM, PL, PACC,
    sq_b, sq_h, skc_s, skc_c, skc_h, svc_s, svc_c, svc_h, so_b, so_h,
    CAP, qk_scale, NQ, WINDOW: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(SLOT + b).to(tl.int64)
    pos = tl.load(POS + b).to(tl.int64)
    lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else pos * 0
    nblocks = tl.cdiv(pos - lo + 1, BLOCK_N)
    bps = tl.cdiv(nblocks, SPLITS)
    blk0 = split * bps
    blk1 = tl.minimum(blk0 + bps, nblocks)
    if blk0 >= blk1:
        return

    g = tl.arange(0, G_P)
    heads = kvh * G + g  # [G_P]
    hmask = g < G
    cols = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + cols[None, :], mask=hmask[:, None],
                other=0.0)  # [G_P, D]
    m = tl.full([G_P], float("-inf"), tl.float32)
    ell = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D], tl.float32)
    k_base = KC + slot * skc_s + kvh * skc_h
    v_base = VC + slot * svc_s + kvh * svc_h
    offs = tl.arange(0, BLOCK_N)
    for blk in range(blk0, blk1):
        kpos = lo + blk * BLOCK_N + offs  # [BLOCK_N] logical positions
        valid = kpos <= pos
        idx = kpos % CAP
        k = tl.load(k_base + idx[:, None] * skc_c + cols[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_P, BLOCK_N] log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m, alpha, p, ell = _online_softmax(s, m, ell)
        v = tl.load(v_base + idx[:, None] * svc_c + cols[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    if SPLITS == 1:
        sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
        m_f = tl.maximum(m, sink)
        scale = tl.exp2(m - m_f)
        denom = ell * scale + tl.exp2(sink - m_f)
        out = acc * (scale / denom)[:, None]
        tl.store(OUT + b * so_b + heads[:, None] * so_h + cols[None, :],
                 out.to(OUT.dtype.element_ty), mask=hmask[:, None])
    else:
        part = (b * NQ + heads) * SPLITS_P + split  # [G_P] into [B, nq, SPLITS_P]
        tl.store(PM + part, m, mask=hmask)
        tl.store(PL + part, ell, mask=hmask)
        tl.store(PACC + part[:, None] * D + cols[None, :], acc, mask=hmask[:, None])


@jit
def _merge_kernel(
    POS, SINK, OUT, PM, PL, PACC, so_b, so_h, NQ, WINDOW: tl.constexpr,
    D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(POS + b).to(tl.int64)
    lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else pos * 0
    nblocks = tl.cdiv(pos - lo + 1, BLOCK_N)
    active = tl.cdiv(nblocks, tl.cdiv(nblocks, SPLITS))  # splits that had work
    sp = tl.arange(0, SPLITS_P)
    smask = sp < active
    base = (b * NQ + h) * SPLITS_P
    m = tl.load(PM + base + sp, mask=smask, other=float("-inf"))
    ell = tl.load(PL + base + sp, mask=smask, other=0.0)
    cols = tl.arange(0, D)
    acc = tl.load(PACC + (base + sp)[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
    sink = tl.load(SINK + h) * 1.4426950408889634
    m_f = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.where(smask, tl.exp2(m - m_f), 0.0)  # [SPLITS_P]
    denom = tl.sum(w * ell, axis=0) + tl.exp2(sink - m_f)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(OUT + b * so_b + h * so_h + cols, out.to(OUT.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, nkv: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Splits per (row, KV head): enough programs for ~2 waves over the SMs, each with at least 4
    key blocks to amortize the merge (a 128-key window gets one split and no merge). Depends on
    shapes only, so a CUDA graph's grid stays valid."""
    blocks = max(1, math.ceil(max_keys / block_n))
    want = math.ceil(2 * _num_sms(device) / max(1, batch * nkv))
    return max(1, min(want, blocks // 4, MAX_SPLITS))


def check_decode_inputs(name: str, q: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_ids: torch.Tensor, positions: torch.Tensor,
                        sinks: torch.Tensor, window: int) -> None:
    """ValueError, prefixed with the launcher's name, naming the first of a decode attention's
    common inputs it cannot take: q [B, nq, d], the caches [S+1, C, nkv, d] of q's dtype, slot_ids
    and positions [B] integer, sinks fp32 [nq], window ≥ 0, one device (decode_attention and
    decode_rope_attention.rope_decode_attention, which checks its own k, v and tables too)."""
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [B, nq, d], got {tuple(q.shape)}")
    bsz, nq, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != d:
        raise ValueError(f"{name}: caches must both be [S+1, C, nkv, {d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    nkv = k_cache.shape[2]
    if nq % nkv:
        raise ValueError(f"{name}: {nq} query heads not a multiple of {nkv} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"{name}: head_dim must be a power of two ≥ 16, got {d}")
    if k_cache.dtype != v_cache.dtype or q.dtype != k_cache.dtype:
        raise ValueError(f"{name}: q ({q.dtype}) and caches ({k_cache.dtype}, {v_cache.dtype}) "
                         "differ")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"{name}: q and the caches need a contiguous last dimension")
    if slot_ids.shape != (bsz,) or positions.shape != (bsz,):
        raise ValueError(f"{name}: slot_ids and positions must be [{bsz}]")
    if slot_ids.dtype.is_floating_point or positions.dtype.is_floating_point:
        raise ValueError(f"{name}: slot_ids and positions must be integer tensors")
    if sinks.shape != (nq,) or sinks.dtype != torch.float32:
        raise ValueError(f"{name}: sinks must be fp32 [{nq}]")
    if window < 0:
        raise ValueError(f"{name}: window must be ≥ 0, got {window}")
    if any(x.device != q.device for x in (k_cache, v_cache, slot_ids, positions, sinks)):
        raise ValueError(f"{name}: all tensors must be on one device")


def decode_attention(
    q: torch.Tensor,  # [B, nq, d] (rotated)
    k_cache: torch.Tensor,  # [S+1, C, nkv, d]
    v_cache: torch.Tensor,  # [S+1, C, nkv, d]
    slot_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    sinks: torch.Tensor,  # [nq] fp32
    window: int,  # 0 = full causal
    scale: float,
    *,
    block_n: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    config: DecodeVariant | None = None,
) -> torch.Tensor:
    """Triton decode_attention_ref. The cache must already hold positions 0 … positions[b] of each
    row's slot (and positions[b] < C on full layers); neither is checked on the device.

    config: run the one-launch fused-merge kernel of decode_variants.py with that launch shape
    (block_n / num_warps / num_stages above are then ignored; num_splits still overrides the
    split count, capped at config.max_splits). See there: one stream at a time per device."""
    check_decode_inputs("decode_attention", q, k_cache, v_cache, slot_ids, positions, sinks,
                        window)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"decode_attention: block_n must be a power of two ≥ 16, got {block_n}")
    bsz, nq, d = q.shape
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((bsz, nq, d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    max_keys = min(cap, window) if window > 0 else cap
    slot_ids, positions, sinks = slot_ids.contiguous(), positions.contiguous(), sinks.contiguous()
    if config is not None:
        splits = num_splits or config.splits(bsz, nkv, max_keys, _num_sms(q.device))
        launch_fused(q, k_cache, v_cache, slot_ids, positions, sinks, window, scale, out, splits,
                     config)
        return out
    splits = num_splits or decode_splits(bsz, nkv, max_keys, block_n, q.device)
    splits = max(1, min(splits, MAX_SPLITS))
    splits_p = triton.next_power_of_2(splits)
    g = nq // nkv
    if splits > 1:
        pm = torch.empty((bsz, nq, splits_p), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((bsz, nq, splits_p, d), dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = out  # unused
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: no TF32 rounding
    jit["_decode_kernel"][(bsz, nkv, splits)](
        q, k_cache, v_cache, slot_ids, positions, sinks, out, pm, pl, pacc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        cap, scale * LOG2E, nq, window,
        G=g, G_P=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=block_n,
        SPLITS=splits, SPLITS_P=splits_p, PRECISION=precision, num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        jit["_merge_kernel"][(bsz, nq)](
            positions, sinks, out, pm, pl, pacc, out.stride(0), out.stride(1), nq, window,
            D=d, BLOCK_N=block_n, SPLITS=splits, SPLITS_P=splits_p, num_warps=4,
        )
    return out
