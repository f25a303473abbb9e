"""Decode attention with rope and the K/V cache write of the new token in the same launch.

Row b is one new token of slot slot_ids[b] at position p = positions[b], with its UNROTATED
q [nq, d], k, v [nkv, d] (views into the qkv projection). The result is exactly
rope_cache_write then decode attention (kernels/rope.py, kernels/decode_variants.py):
    q' = rope(q, p),  k' = rope(k, p),  cache[slot, p mod C] ← (k', v)
    o = Σᵢ exp(sᵢ − m) vᵢ / (exp(sink − m) + Σᵢ exp(sᵢ − m)),  sᵢ = scale·q'·kᵢ,  i ∈ [lo(p), p]
with rope(x) = [x₁·cos − x₂·sin | x₂·cos + x₁·sin] (halves of d/2, the YaRN table's row p).
It saves rope_cache_write's launch (and its write-then-read of q) on decode-only steps.

Same grid and split layout as the fused-merge kernel (one program per (row, KV head, split),
DecodeVariant's launch shape, the last-arriving split merges): every program rotates its G query
heads in registers, kept as two halves [G, d/2] (rope.py's products and rounding, so q' has its
bits; no gather of partner elements, which the compiler would issue as scalar loads), and takes each
key block's scores as q'₁·k₁ᵀ + q'₂·k₂ᵀ (two tensor-core products of depth d/2 into one accumulator:
the same MMAs as one of depth d; d = 16 pads the halves to depth 16). The cache loop reads keys
lo(p) … p − 1 only. The new key is never read from the cache: the split that owns the row's last key
block (split active − 1) rotates k, folds (k', v) into its online softmax from registers (one more
key: s = scale·q'·k', p rounded to the value dtype as the loop's dot does) and is the one program
per (row, KV head) that stores k', v into the cache, with rope.py's rounding (the activation dtype,
then the cache's), so the cache gets the same bits. No program reads the index it writes: on a ring
the keys read are > p − W ≥ p − C (capacity C ≥ window W, as runtime/kv_cache.py plans it, or p <
C), and full layers index by position.

Rows must target distinct slots, except rows at position 0 (they read no cache key): the
runtime's decode steps (one token per slot, graph padding on the dummy slot at position 0). Not
checked on the device (no host sync), nor are positions < the table's rows.
"""

from __future__ import annotations

import torch
import triton.language as tl

from kernels import pdl
from kernels.decode_attention import (
    LOG2E,
    _num_sms,
    check_decode_inputs,
    decode_attention_ref,
)
from kernels.decode_variants import (
    SERVING,
    DecodeVariant,
    _finish,  # noqa: F401 - _split_done calls them, resolved in this set's copy
    _merge,  # noqa: F401
    _merge_once,  # noqa: F401
    _online_softmax,
    _split_done,
    fused_launch,
)
from kernels.jit import KernelSet
from kernels.pdl import wait_then_release
from kernels.rope import rope_cache_write_ref

jit = KernelSet(globals())
pdl.register(jit)
# decode_variants' helpers, compiled or interpreted with this set
for _helper in (_finish, _merge, _merge_once, _online_softmax, _split_done):
    jit(_helper)


def rope_decode_attention_ref(
    q: torch.Tensor,  # [B, nq, d] unrotated
    k: torch.Tensor,  # [B, nkv, d] unrotated
    v: torch.Tensor,  # [B, nkv, d]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    v_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    slot_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    sinks: torch.Tensor,  # [nq] fp32
    window: int,  # 0 = full causal
    scale: float,
) -> torch.Tensor:
    """rope_cache_write_ref then decode_attention_ref: the attention output [B, nq, d]."""
    q_rot = rope_cache_write_ref(q, k, v, cos_table, sin_table, positions, slot_ids, k_cache,
                                 v_cache)
    return decode_attention_ref(q_rot, k_cache, v_cache, slot_ids, positions, sinks, window,
                                scale)


@jit(do_not_specialize=("CAP", "SPLITS"))
def _rope_decode_kernel(
    Q, K, V, COS, SIN, KC, VC, SLOT, POS, SINK, OUT, PM, PL, PACC, CNT,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_s, skc_c, skc_h, svc_s, svc_c, svc_h, so_b, so_h,
    CAP, qk_scale, NQ, NKV, SPLITS, WINDOW: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, G_M: tl.constexpr, D: tl.constexpr,
    HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_P: tl.constexpr,
    MERGE_S: tl.constexpr, KV_TOGETHER: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False, SINK_FIRST: tl.constexpr = False, MERGE_ONCE: tl.constexpr = False,
    EARLY_SLOT: tl.constexpr = False,
):
    wait_then_release(PDL)  # kernels/pdl.py: q, k, v come from the predecessor (the qkv GEMV)
    HALF: tl.constexpr = D // 2
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_P)
    heads = kvh * G + g  # [G_P]
    hmask = g < G
    cols = tl.arange(0, D)
    # rope pairs element i with i + d/2: every head vector in halves, padded to HALF_P ≥ 16
    # columns (the products' least depth) when d < 32; the padding is masked to zeros
    hc = tl.arange(0, HALF_P)
    hcm = hc < HALF
    # Independent of the position: issued with the slot/position loads. The new token's k and v
    # (256 bytes at d 64) are loaded by every program; only the last split uses them.
    q_row = Q + b * sq_b + heads[:, None] * sq_h + hc[None, :]
    qm = hmask[:, None] & hcm[None, :]
    q1 = tl.load(q_row, mask=qm, other=0.0).to(tl.float32)  # [G_P, D/2]
    q2 = tl.load(q_row + HALF, mask=qm, other=0.0).to(tl.float32)
    k_row = K + b * sk_b + kvh * sk_h + hc
    k1 = tl.load(k_row, mask=hcm, other=0.0).to(tl.float32)  # [D/2]
    k2 = tl.load(k_row + HALF, mask=hcm, other=0.0).to(tl.float32)
    v_new = tl.load(V + b * sv_b + kvh * sv_h + cols).to(VC.dtype.element_ty)  # [D]
    if SINK_FIRST:
        sink = tl.load(SINK + heads, mask=hmask, other=0.0) * 1.4426950408889634
    else:
        sink = tl.zeros([G_P], tl.float32)  # placeholder: _split_done loads it after the keys
    slot = tl.load(SLOT + b).to(tl.int64)
    pos = tl.load(POS + b).to(tl.int32)
    lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else pos * 0
    nblocks = tl.cdiv(pos - lo + 1, BLOCK_N)  # key blocks of [lo, p], the new key included
    bps = tl.cdiv(nblocks, SPLITS)
    active = tl.cdiv(nblocks, bps)
    stop = split >= active
    if EARLY_SLOT:
        stop = stop | (slot < 0)
    if stop:
        return
    c = tl.load(COS + pos * HALF + hc, mask=hcm, other=0.0)  # [D/2] fp32, the table's row p
    s = tl.load(SIN + pos * HALF + hc, mask=hcm, other=0.0)
    # rope.py's expressions and rounding: q' as rope_cache_write returns it, k' as it stores it
    qr1 = (q1 * c[None, :] - q2 * s[None, :]).to(Q.dtype.element_ty)  # [G_P, D/2]
    qr2 = (q2 * c[None, :] + q1 * s[None, :]).to(Q.dtype.element_ty)
    kn1 = (k1 * c - k2 * s).to(K.dtype.element_ty).to(KC.dtype.element_ty)  # [D/2]
    kn2 = (k2 * c + k1 * s).to(K.dtype.element_ty).to(KC.dtype.element_ty)
    blk0 = split * bps
    # cached keys are lo … p − 1: a last block holding only p is not iterated
    blk1 = tl.minimum(blk0 + bps, tl.cdiv(pos - lo, BLOCK_N))

    m = tl.full([G_P], float("-inf"), tl.float32)
    ell = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D], tl.float32)
    k_base = KC + slot * skc_s + kvh * skc_h
    v_base = VC + slot * svc_s + kvh * svc_h
    offs = tl.arange(0, BLOCK_N)
    for blk in range(blk0, blk1):  # every iterated block has a key < p: m stays finite
        kpos = lo + blk * BLOCK_N + offs  # [BLOCK_N] logical positions
        valid = kpos < pos
        idx = kpos % CAP if WINDOW > 0 else kpos
        k_ptr = k_base + idx[:, None].to(tl.int64) * skc_c + hc[None, :]  # [BLOCK_N, D/2]
        km = valid[:, None] & hcm[None, :]
        ka = tl.load(k_ptr, mask=km, other=0.0)
        kb = tl.load(k_ptr + HALF, mask=km, other=0.0)
        if KV_TOGETHER:
            v = tl.load(v_base + idx[:, None].to(tl.int64) * svc_c + cols[None, :],
                        mask=valid[:, None], other=0.0)
        sc = tl.dot(qr1, tl.trans(ka), input_precision=PRECISION)  # q'·k in two halves
        sc = tl.dot(qr2, tl.trans(kb), sc, input_precision=PRECISION) * qk_scale  # [G_P, BLOCK_N]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m, alpha, p, ell = _online_softmax(sc, m, ell)
        if not KV_TOGETHER:
            v = tl.load(v_base + idx[:, None].to(tl.int64) * svc_c + cols[None, :],
                        mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    if split == active - 1:  # the owner of key p: write it, then fold it in from registers
        at = (pos % CAP).to(tl.int64)
        kc_row = KC + slot * skc_s + at * skc_c + kvh * skc_h + hc
        tl.store(kc_row, kn1, mask=hcm)
        tl.store(kc_row + HALF, kn2, mask=hcm)
        tl.store(VC + slot * svc_s + at * svc_c + kvh * svc_h + cols, v_new)
        s_new = (tl.sum(qr1.to(tl.float32) * kn1.to(tl.float32)[None, :], axis=1)
                 + tl.sum(qr2.to(tl.float32) * kn2.to(tl.float32)[None, :], axis=1)) * qk_scale
        m_new = tl.maximum(m, s_new)  # [G_P], finite
        alpha = tl.exp2(m - m_new)
        p_new = tl.exp2(s_new - m_new)
        ell = ell * alpha + p_new
        pv = p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        acc = acc * alpha[:, None] + pv
        m = m_new

    _split_done(OUT, PM, PL, PACC, CNT, SINK, b, kvh, split, heads, hmask, cols, sink, m, ell,
                acc, active, so_b, so_h, NQ, NKV, SPLITS, G, G_M, SPLITS_P, MERGE_S, D,
                SINK_FIRST, MERGE_ONCE)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_ids: torch.Tensor, positions: torch.Tensor, sinks: torch.Tensor,
           window: int) -> None:
    """ValueError naming the first input the kernel cannot take: decode_attention's checks of q,
    the caches and the rows, then the new token's k, v and the rope tables."""
    name = "rope_decode_attention"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: q, k, v must be [B, heads, d]")
    check_decode_inputs(name, q, k_cache, v_cache, slot_ids, positions, sinks, window)
    bsz, _, d = q.shape
    nkv = k_cache.shape[2]
    if k.shape != (bsz, nkv, d) or v.shape != (bsz, nkv, d):
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[{bsz}, {nkv}, {d}] (the caches' KV heads)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v and the caches must share one dtype, got "
                         f"{q.dtype} {k.dtype} {v.dtype} {k_cache.dtype} {v_cache.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{name}: k and v need a contiguous last dimension")
    for label, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if (table.dim() != 2 or table.shape[1] != d // 2 or table.dtype != torch.float32
                or not table.is_contiguous()):
            raise ValueError(f"{name}: {label} must be contiguous fp32 [P, {d // 2}]")
    if any(x.device != q.device for x in (k, v, cos_table, sin_table)):
        raise ValueError(f"{name}: all tensors must be on one device")


def rope_decode_attention(
    q: torch.Tensor,  # [B, nq, d] unrotated (a view of the qkv projection)
    k: torch.Tensor,  # [B, nkv, d] unrotated
    v: torch.Tensor,  # [B, nkv, d]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], row p mod C of each row's slot written
    v_cache: torch.Tensor,  # [S+1, C, nkv, d]
    slot_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    sinks: torch.Tensor,  # [nq] fp32
    window: int,  # 0 = full causal
    scale: float,
    *,
    config: DecodeVariant = SERVING,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton rope_decode_attention_ref in one launch: the attention output [B, nq, d]; k', v
    written into the caches (the rotated q is not materialized). The caches must hold positions
    lo(p) … p − 1 of each row's slot (and p < C on full layers). config: the fused-merge launch
    shape (decode_variants.DecodeVariant); num_splits overrides its split count (capped at
    config.max_splits). One stream at a time per device (the arrival counters)."""
    _check(q, k, v, cos_table, sin_table, k_cache, v_cache, slot_ids, positions, sinks, window)
    bsz, nq, d = q.shape
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((bsz, nq, d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    max_keys = min(cap, window) if window > 0 else cap
    splits = num_splits or config.splits(bsz, nkv, max_keys, _num_sms(q.device))
    launch = fused_launch(out, nkv, splits, config, "rope_decode_attention")
    jit["_rope_decode_kernel"][(bsz, nkv, launch.splits)](
        q, k, v, cos_table, sin_table, k_cache, v_cache, slot_ids.contiguous(),
        positions.contiguous(), sinks.contiguous(), out, *launch.buffers,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        cap, scale * LOG2E, nq, nkv, launch.splits, window, HALF_P=max(16, d // 2),
        **launch.kwargs,
    )
    return out
