"""Decode attention variants: one launch (fused merge) and launch shapes for long contexts.

Chosen through `decode_attention(..., config=DecodeVariant(...))` (the runtime passes `SERVING`);
without a config the two kernels of decode_attention.py run. Same math and split layout as there
(see its docstring); what differs:

- Fused merge: no second launch. Each split program with work writes its (m, ℓ, acc) partials,
  then increments an arrival counter of its (row, KV head) (acq_rel, GPU scope, after a barrier so
  every thread's partial stores precede the release). The program that sees `active − 1` (it
  arrived last) reads the partials back (bypassing L1: other SMs wrote them), combines them with
  the sink, writes the output rows of the G query heads and resets the counter to 0, so the next
  launch (or CUDA-graph replay) needs no memset. Programs past a row's length return before the
  counter and the arrival target is `active`, computed by every program with the same integer
  formula as the block range (split s has blocks iff s < active = ⌈blocks / ⌈blocks/splits⌉⌉).
  A row whose keys fit in one split (`active` = 1) writes its output directly: no partials,
  no counter.
- The split count is a runtime argument (the partials' row stride), not a compile-time one: one
  compiled variant per config whatever the batch and context (SPLITS_P, the merge's vector width,
  is fixed by the config's max_splits).
- The query rows are loaded before the row's length is known (overlapping the slot/position
  loads); `kv_together` issues the V block's load with the K block's, before the math.
- 32-bit position arithmetic (positions < 2³¹), and full layers index the cache by position
  (positions < C there, as decode_attention requires): no 64-bit division or modulo.
- Latency options (opt-in, kernels/decode_latency.py has the candidates): `early_slot` makes the
  early return test the slot too (`slot < 0`, never true for a valid slot), so the compiler cannot
  sink the slot load below that branch (the SASS of the default issues it only after the
  position has arrived: position → slot → K/V are 3 round trips, 2 with it); `sink_first` loads the sinks with q (a one-split row
  otherwise waits one more round trip for them after its keys);
  `merge_once` has the merging program load every partial (m, ℓ and acc) in one round instead of
  m/ℓ first, then acc in rounds of MERGE_S: one dependent round trip after the counter, not 3.

Counters: a persistent zeroed int32 buffer per device cached in this module (≥ B·nkv entries, one
per (row, KV head)); kernels leave it at zero. ONE STREAM AT A TIME may run fused decode
attention on a device (two concurrent launches would share counters); CUDA graphs captured on a
side stream and replayed on the main stream are fine. The buffer only grows outside graph capture
(a graph holds the raw address, so an outgrown buffer is kept alive, never freed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.jit import KernelSet
from kernels.pdl import wait_then_release

jit = KernelSet(globals())
pdl.register(jit)
MIN_COUNTERS = 1 << 14  # B·nkv ≤ 16384 without growing (64 KB)
MERGE_FLOATS = 8192  # one merge load round: G·MERGE_S·D fp32 (32 KB, 64 per thread at 4 warps)
MERGE_ONCE_FLOATS = 16384  # merge_once: G_M·SPLITS_P·D fp32 at most (128 per thread at 4 warps)


@dataclass(frozen=True)
class DecodeVariant:
    """Launch shape of the fused-merge decode kernel.

    splits per (row, KV head) = min(⌈programs_per_sm · SMs / (B · nkv)⌉, blocks // min_blocks,
    max_splits), blocks = ⌈max keys / block_n⌉ (shapes only: CUDA-graph safe)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2  # software pipelining depth of the K/V loads (2 = one block, no overlap)
    programs_per_sm: int = 2
    min_blocks: int = 4  # key blocks per split at least (amortizes the partials and merge)
    max_splits: int = 64
    kv_together: bool = False
    merge_splits: int = 0  # partials per merge load round; 0: as many as fit MERGE_FLOATS
    sink_first: bool = False  # sinks loaded with q (not after the keys, on the one-split path)
    early_slot: bool = False  # slot issued with the position (not after the early return)
    merge_once: bool = False  # the merge loads all partials in one round (≤ MERGE_ONCE_FLOATS)

    def __post_init__(self) -> None:
        for name in ("block_n", "max_splits", "merge_splits"):
            v = getattr(self, name)
            if (v < 1 and name != "merge_splits") or v < 0 or v & (v - 1):
                raise ValueError(f"DecodeVariant.{name} must be a power of two, got {v}")
        if self.block_n < 16:
            raise ValueError(f"DecodeVariant.block_n must be ≥ 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeVariant.num_warps must be 1…16 (power of 2), got "
                             f"{self.num_warps}")
        if self.num_stages < 1 or self.programs_per_sm < 1 or self.min_blocks < 1:
            raise ValueError("DecodeVariant: num_stages, programs_per_sm, min_blocks must be ≥ 1")

    def splits(self, batch: int, nkv: int, max_keys: int, sms: int) -> int:
        blocks = max(1, math.ceil(max_keys / self.block_n))
        want = math.ceil(self.programs_per_sm * sms / max(1, batch * nkv))
        return max(1, min(want, blocks // self.min_blocks, self.max_splits))


# Named candidates for the GPU comparison (bench.kernels --decode-variants): keyword arguments of
# decode_attention. "default" is today's two-launch path.
CANDIDATES: dict[str, dict[str, object]] = {
    "default": {},
    "default_s3": {"num_stages": 3},  # two launches, K/V loads one block ahead
    "fused": {"config": DecodeVariant()},  # today's launch shape, one launch
    "fused_s3": {"config": DecodeVariant(num_stages=3)},
    "fused_s4": {"config": DecodeVariant(num_stages=4)},
    "fused_bn128_s3": {"config": DecodeVariant(block_n=128, num_stages=3, min_blocks=2)},
    "fused_wide_s3": {"config": DecodeVariant(num_stages=3, programs_per_sm=4, min_blocks=2,
                                              max_splits=128)},
    "fused_kv_s1": {"config": DecodeVariant(num_stages=1, programs_per_sm=4, min_blocks=2,
                                            kv_together=True)},
}

# What the runtime uses (runtime/ops_triton.py): fused merge, K/V loads one block ahead. Measured
# on the H100 against the two-launch path (`bench.kernels --decode-variants`, 2026-12-06,
# bench/results/kernels.jsonl), µs: B=1 at 1k/4k/32k 5.3/7.1/28.2 (was 6.5/8.5/38.8), window 128
# 3.6 (5.0), B=8 4k 28.6 (36.2), B=32 94.8 (97.4), B=64 179.2 (179.8).
SERVING = DecodeVariant(num_stages=3)
# ...for batches up to this many rows (the largest measured); larger ones keep the two-launch
# kernels, which the load runs at 256-512 streams were measured with (a single split each there).
SERVING_MAX_ROWS = 64

_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # graphs captured earlier may still point at these


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 arrival counters, at least n of them (see the module doc)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"decode attention: {n} arrival counters needed while capturing a CUDA graph; "
                "run one call of this batch size before capture")
        if buf is not None:
            _OUTGROWN.append(buf)
        size = max(MIN_COUNTERS, triton.next_power_of_2(n))
        buf = _COUNTERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


@jit
def _online_softmax(s, m, ell):
    """One more key block into a running softmax (log2 units): s [G_P, BLOCK_N] the block's
    scaled scores, −inf where no key; m, ℓ [G_P] the running max and sum, m finite after the
    block for every row the caller keeps. Returns (m', α, p, ℓ'): m' = max(m, max s),
    α = 2^(m − m') the factor on the earlier sums, p = 2^(s − m') the block's weights,
    ℓ' = α·ℓ + Σ p. The caller scales its accumulator by α and adds p·V."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, ell * alpha + tl.sum(p, axis=1)


@jit
def _finish(OUT, o_rows, cols, hmask, sink, m, ell, acc):
    """Output of one split holding all the row's keys: the sink (log2 units) joins the
    denominator."""
    m_f = tl.maximum(m, sink)
    scale = tl.exp2(m - m_f)
    out = acc * (scale / (ell * scale + tl.exp2(sink - m_f)))[:, None]
    tl.store(OUT + o_rows[:, None] + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=hmask[:, None])


@jit
def _merge(PM, PL, PACC, SINK, OUT, o_rows, part_rows, cols, hmask, heads, active,
           G_M: tl.constexpr, SPLITS_P: tl.constexpr, MERGE_S: tl.constexpr, D: tl.constexpr):
    """Combines the `active` partials of G heads (rows part_rows[g] of PM/PL/PACC) with the sink:
    M = max(sink, maxₛ mₛ); o = Σₛ 2^(mₛ−M) accₛ / (2^(sink−M) + Σₛ 2^(mₛ−M) ℓₛ)."""
    sp = tl.arange(0, SPLITS_P)
    use = hmask[:, None] & (sp[None, :] < active)  # [G_M, SPLITS_P]
    m = tl.load(PM + part_rows[:, None] + sp[None, :], mask=use, other=float("-inf"),
                cache_modifier=".cg")
    ell = tl.load(PL + part_rows[:, None] + sp[None, :], mask=use, other=0.0,
                  cache_modifier=".cg")
    sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
    m_f = tl.maximum(tl.max(m, axis=1), sink)  # [G_M]
    w = tl.where(use, tl.exp2(m - m_f[:, None]), 0.0)
    denom = tl.sum(w * ell, axis=1) + tl.exp2(sink - m_f)
    acc = tl.zeros([G_M, D], tl.float32)
    cs = tl.arange(0, MERGE_S)
    for c in tl.range(0, active, MERGE_S, num_stages=1):  # MERGE_S splits per load round
        s = c + cs
        cm = hmask[:, None] & (s[None, :] < active)  # [G_M, MERGE_S]
        ms = tl.load(PM + part_rows[:, None] + s[None, :], mask=cm, other=float("-inf"),
                     cache_modifier=".cg")
        ws = tl.where(cm, tl.exp2(ms - m_f[:, None]), 0.0)
        rows = (part_rows[:, None] + s[None, :]) * D  # [G_M, MERGE_S]
        part = tl.load(PACC + rows[:, :, None] + cols[None, None, :], mask=cm[:, :, None],
                       other=0.0, cache_modifier=".cg")  # [G_M, MERGE_S, D]
        acc += tl.sum(part * ws[:, :, None], axis=1)
    out = acc / denom[:, None]
    tl.store(OUT + o_rows[:, None] + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=hmask[:, None])


@jit
def _merge_once(PM, PL, PACC, SINK, OUT, o_rows, part_rows, cols, hmask, heads, active,
                G_M: tl.constexpr, SPLITS_P: tl.constexpr, D: tl.constexpr):
    """_merge with every load issued before any math: m, ℓ, the sink and all SPLITS_P acc
    partials of the G heads in one round trip ([G_M, SPLITS_P, D] fp32 in registers)."""
    sp = tl.arange(0, SPLITS_P)
    use = hmask[:, None] & (sp[None, :] < active)  # [G_M, SPLITS_P]
    m = tl.load(PM + part_rows[:, None] + sp[None, :], mask=use, other=float("-inf"),
                cache_modifier=".cg")
    ell = tl.load(PL + part_rows[:, None] + sp[None, :], mask=use, other=0.0,
                  cache_modifier=".cg")
    rows = (part_rows[:, None] + sp[None, :]) * D  # [G_M, SPLITS_P]
    part = tl.load(PACC + rows[:, :, None] + cols[None, None, :], mask=use[:, :, None],
                   other=0.0, cache_modifier=".cg")  # [G_M, SPLITS_P, D]
    sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
    m_f = tl.maximum(tl.max(m, axis=1), sink)  # [G_M]
    w = tl.where(use, tl.exp2(m - m_f[:, None]), 0.0)
    denom = tl.sum(w * ell, axis=1) + tl.exp2(sink - m_f)
    out = tl.sum(part * w[:, :, None], axis=1) / denom[:, None]
    tl.store(OUT + o_rows[:, None] + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=hmask[:, None])


@jit
def _split_done(OUT, PM, PL, PACC, CNT, SINK, b, kvh, split, heads, hmask, cols, sink, m, ell,
                acc, active, so_b, so_h, NQ, NKV, SPLITS, G: tl.constexpr, G_M: tl.constexpr,
                SPLITS_P: tl.constexpr, MERGE_S: tl.constexpr, D: tl.constexpr,
                SINK_FIRST: tl.constexpr, MERGE_ONCE: tl.constexpr):
    """A split's softmax state (m, ℓ, acc) [G_P] / [G_P, D] to the output: written directly when
    the row has one active split, else stored as partials, and the last split to arrive merges
    them and resets the counter (the module docstring's fused merge). Without SINK_FIRST the
    sinks are loaded here (sink is then a placeholder)."""
    if active == 1:
        if not SINK_FIRST:
            sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
        _finish(OUT, b * so_b + heads * so_h, cols, hmask, sink, m, ell, acc)
    else:
        part = (b * NQ + heads) * SPLITS + split  # [G_P] into [B, nq, SPLITS]
        tl.store(PM + part, m, mask=hmask)
        tl.store(PL + part, ell, mask=hmask)
        tl.store(PACC + part[:, None] * D + cols[None, :], acc, mask=hmask[:, None])
        tl.debug_barrier()  # every thread's partial stores precede the release below
        cnt = CNT + b * NKV + kvh
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == active - 1:  # the last of the row's active splits: merge
            tl.debug_barrier()
            gm = tl.arange(0, G_M)
            heads_m = kvh * G + gm
            if MERGE_ONCE:
                _merge_once(PM, PL, PACC, SINK, OUT, b * so_b + heads_m * so_h,
                            (b * NQ + heads_m) * SPLITS, cols, gm < G, heads_m, active,
                            G_M, SPLITS_P, D)
            else:
                _merge(PM, PL, PACC, SINK, OUT, b * so_b + heads_m * so_h,
                       (b * NQ + heads_m) * SPLITS, cols, gm < G, heads_m, active,
                       G_M, SPLITS_P, MERGE_S, D)
            tl.store(cnt, 0)  # ready for the next launch (and graph replay)


@jit(do_not_specialize=("CAP", "SPLITS"))
def _fused_decode_kernel(
    Q, KC, VC, SLOT, POS, SINK, OUT, PM, PL, PACC, CNT,
    sq_b, sq_h, skc_s, skc_c, skc_h, svc_s, svc_c, svc_h, so_b, so_h,
    CAP, qk_scale, NQ, NKV, SPLITS, WINDOW: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, G_M: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS_P: tl.constexpr, MERGE_S: tl.constexpr,
    KV_TOGETHER: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    SINK_FIRST: tl.constexpr = False, MERGE_ONCE: tl.constexpr = False,
    EARLY_SLOT: tl.constexpr = False,
):
    wait_then_release(PDL)  # kernels/pdl.py: q and the new K/V come from the predecessor
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_P)
    heads = kvh * G + g  # [G_P]
    hmask = g < G
    cols = tl.arange(0, D)
    # q does not depend on the row's length: issued with the slot/position loads
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + cols[None, :], mask=hmask[:, None],
                other=0.0)  # [G_P, D]
    if SINK_FIRST:  # with q: no round trip for it after the keys
        sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
    else:
        sink = tl.zeros([G_P], tl.float32)  # placeholder: _split_done loads it after the keys
    slot = tl.load(SLOT + b).to(tl.int64)
    pos = tl.load(POS + b).to(tl.int32)  # 32-bit block arithmetic: no 64-bit divisions
    lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else pos * 0
    nblocks = tl.cdiv(pos - lo + 1, BLOCK_N)
    bps = tl.cdiv(nblocks, SPLITS)
    active = tl.cdiv(nblocks, bps)  # split s has key blocks iff s < active: the arrival target
    stop = split >= active
    if EARLY_SLOT:  # the branch waits for the slot too: its load is issued with the position's
        stop = stop | (slot < 0)
    if stop:
        return
    blk0 = split * bps
    blk1 = tl.minimum(blk0 + bps, nblocks)

    m = tl.full([G_P], float("-inf"), tl.float32)
    ell = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D], tl.float32)
    k_base = KC + slot * skc_s + kvh * skc_h
    v_base = VC + slot * svc_s + kvh * svc_h
    offs = tl.arange(0, BLOCK_N)
    for blk in range(blk0, blk1):
        kpos = lo + blk * BLOCK_N + offs  # [BLOCK_N] logical positions
        valid = kpos <= pos
        # a ring on sliding layers; a full layer holds positions < C at their own index
        idx = kpos % CAP if WINDOW > 0 else kpos
        k = tl.load(k_base + idx[:, None].to(tl.int64) * skc_c + cols[None, :],
                    mask=valid[:, None], other=0.0)
        if KV_TOGETHER:
            v = tl.load(v_base + idx[:, None].to(tl.int64) * svc_c + cols[None, :],
                        mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_P, BLOCK_N] log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m, alpha, p, ell = _online_softmax(s, m, ell)
        if not KV_TOGETHER:
            v = tl.load(v_base + idx[:, None].to(tl.int64) * svc_c + cols[None, :],
                        mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    _split_done(OUT, PM, PL, PACC, CNT, SINK, b, kvh, split, heads, hmask, cols, sink, m, ell,
                acc, active, so_b, so_h, NQ, NKV, SPLITS, G, G_M, SPLITS_P, MERGE_S, D,
                SINK_FIRST, MERGE_ONCE)


def launch_fused(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
    positions: torch.Tensor, sinks: torch.Tensor, window: int, scale: float, out: torch.Tensor,
    splits: int, cfg: DecodeVariant,
) -> None:
    """Runs the fused kernel into out [B, nq, d] (inputs already validated by decode_attention)."""
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    launch = fused_launch(out, nkv, splits, cfg, "decode attention")
    jit["_fused_decode_kernel"][(q.shape[0], nkv, launch.splits)](
        q, k_cache, v_cache, slot_ids, positions, sinks, out, *launch.buffers,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        cap, scale * 1.4426950408889634, q.shape[1], nkv, launch.splits, window,
        **launch.kwargs,
    )


class FusedLaunch(NamedTuple):
    """What a fused-merge launch shares between its kernels (this file's, decode_rope_attention's):
    the split count, the partials and arrival counters (PM, PL, PACC, CNT), and the keyword
    arguments from G to EARLY_SLOT with the launch options."""

    splits: int
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    kwargs: dict[str, Any]


def fused_launch(out: torch.Tensor, nkv: int, splits: int, cfg: DecodeVariant,
                 name: str) -> FusedLaunch:
    """The launch state of a fused-merge kernel writing out [B, nq, d] (its dtype and device are
    the inputs'), splits capped at cfg.max_splits; name labels the error when merge_once cannot
    hold the partials."""
    bsz, nq, d = out.shape
    g = nq // nkv
    splits = max(1, min(splits, cfg.max_splits))
    if splits > 1:
        pm = torch.empty((bsz, nq, splits), dtype=torch.float32, device=out.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((bsz, nq, splits, d), dtype=torch.float32, device=out.device)
    else:
        pm = pl = pacc = out  # unused: one split writes the output itself
    cnt = arrival_counters(bsz * nkv, out.device)
    g_m = triton.next_power_of_2(g)
    splits_p = triton.next_power_of_2(cfg.max_splits)
    merge_s = min(splits_p, cfg.merge_splits or max(1, MERGE_FLOATS // (g_m * d)))
    if cfg.merge_once and g_m * splits_p * d > MERGE_ONCE_FLOATS:
        raise ValueError(f"{name}: merge_once holds {g_m}×{splits_p}×{d} partial "
                         f"floats, more than {MERGE_ONCE_FLOATS}: lower max_splits")
    precision = "ieee" if out.dtype == torch.float32 else None  # fp32: no TF32 rounding
    kwargs = dict(
        G=g, G_P=max(16, triton.next_power_of_2(g)), G_M=g_m, D=d, BLOCK_N=cfg.block_n,
        SPLITS_P=splits_p, MERGE_S=merge_s, KV_TOGETHER=cfg.kv_together,
        PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        SINK_FIRST=cfg.sink_first, MERGE_ONCE=cfg.merge_once, EARLY_SLOT=cfg.early_slot,
        **pdl.launch_args(out.device),
    )
    return FusedLaunch(splits, (pm, pl, pacc, cnt), kwargs)
