"""Rotary position embedding (NeoX halves, YaRN-scaled table) fused with the K/V cache write.

For a head vector x = [x₁ | x₂] (halves of d/2) at position p:
    rope(x) = [x₁·cos − x₂·sin | x₂·cos + x₁·sin],  cos/sin = c·cos(p·ω), c·sin(p·ω)
with ω the YaRN-interpolated inverse frequencies and c the YaRN concentration (runtime/rope.py
builds the table once). The rotated keys and the values of token t are written into the slot's cache
row at index `p mod capacity` (full layers: capacity ≥ context, so the index is p; sliding-window
layers: a ring buffer).
The Triton kernel runs one program per token: it rotates all query and key heads of the token and
stores k and v in one pass. Unlike the reference it does not order duplicate cache targets: no
two tokens of one call may map to the same (slot, index), which holds whenever every sequence's
chunk is at most `capacity` tokens long (runtime: chunk ≤ max_chunk_tokens ≤ ring capacity);
TritonOps checks it from the batch's host-side lists.
YaRN: Peng et al., https://arxiv.org/abs/2309.00071; RoFormer: https://arxiv.org/abs/2104.09864
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.jit import KernelSet
from kernels.pdl import wait_then_release

jit = KernelSet(globals())
pdl.register(jit)


def split_qkv(
    qkv: torch.Tensor,  # [T, (nq + 2·nkv)·d] the attention's projection
    num_heads: int,  # nq
    num_kv_heads: int,  # nkv
    head_dim: int,  # d
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q [T, nq, d], k [T, nkv, d], v [T, nkv, d] of one qkv projection (q heads first,
    then k, then v: the checkpoint's row order)."""
    t, q_size, kv_size = qkv.shape[0], num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(t, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(t, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(t, num_kv_heads, head_dim)
    return q, k, v


def apply_rope_ref(
    x: torch.Tensor,  # [T, n, d]
    cos: torch.Tensor,  # [T, d/2] fp32, rows already gathered at each token's position
    sin: torch.Tensor,  # [T, d/2] fp32
) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, d/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_cache_write_ref(
    q: torch.Tensor,  # [T, nq, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    positions: torch.Tensor,  # [T] int
    slot_ids: torch.Tensor,  # [T] int
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    v_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
) -> torch.Tensor:
    """Rotates q and k, stores k and v in the caches; returns the rotated q [T, nq, d].

    Where several tokens of one slot map to the same ring index, the later position wins.
    """
    pos = positions.long()
    cos, sin = cos_table[pos], sin_table[pos]
    q_rot = apply_rope_ref(q, cos, sin)
    k_rot = apply_rope_ref(k, cos, sin)
    idx = pos % k_cache.shape[1]
    slots = slot_ids.long()
    # Index-put with duplicate targets is unordered in torch: write only each target's last token.
    keep = _last_writer_mask(slots, idx, k_cache.shape[1])
    k_cache[slots[keep], idx[keep]] = k_rot[keep].to(k_cache.dtype)
    v_cache[slots[keep], idx[keep]] = v[keep].to(v_cache.dtype)
    return q_rot


def _last_writer_mask(slots: torch.Tensor, idx: torch.Tensor, cap: int) -> torch.Tensor:
    key = slots * cap + idx  # [T]
    order = torch.arange(key.numel(), device=key.device)
    last = torch.full((int(key.max()) + 1 if key.numel() else 1,), -1, device=key.device)
    last = last.scatter_reduce(0, key, order, reduce="amax")
    return last[key] == order


@jit
def _rope_cache_write_kernel(
    Q, K, V, COS, SIN, POS, SLOT, KC, VC, QO,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    skc_s, skc_c, skc_h, svc_s, svc_c, svc_h, sqo_t, sqo_h,
    CAP, NQ, NKV,
    HALF: tl.constexpr, NQ_P: tl.constexpr, NKV_P: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_then_release(PDL)  # kernels/pdl.py: q, k, v come from the predecessor
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    slot = tl.load(SLOT + t).to(tl.int64)
    idx = pos % CAP
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HALF
    c = tl.load(COS + pos * HALF + cols, mask=cmask, other=0.0)[None, :]  # [1, D/2] fp32
    s = tl.load(SIN + pos * HALF + cols, mask=cmask, other=0.0)[None, :]

    hq = tl.arange(0, NQ_P)[:, None]
    mq = (hq < NQ) & cmask[None, :]
    q_ptr = Q + t * sq_t + hq * sq_h + cols[None, :]
    q1 = tl.load(q_ptr, mask=mq, other=0.0).to(tl.float32)  # [NQ, D/2]
    q2 = tl.load(q_ptr + HALF, mask=mq, other=0.0).to(tl.float32)
    qo_ptr = QO + t * sqo_t + hq * sqo_h + cols[None, :]
    tl.store(qo_ptr, (q1 * c - q2 * s).to(QO.dtype.element_ty), mask=mq)
    tl.store(qo_ptr + HALF, (q2 * c + q1 * s).to(QO.dtype.element_ty), mask=mq)

    hk = tl.arange(0, NKV_P)[:, None]
    mk = (hk < NKV) & cmask[None, :]
    k_ptr = K + t * sk_t + hk * sk_h + cols[None, :]
    k1 = tl.load(k_ptr, mask=mk, other=0.0).to(tl.float32)  # [NKV, D/2]
    k2 = tl.load(k_ptr + HALF, mask=mk, other=0.0).to(tl.float32)
    # Round to the activation dtype first, as the reference does, then to the cache dtype.
    kr1 = (k1 * c - k2 * s).to(K.dtype.element_ty).to(KC.dtype.element_ty)
    kr2 = (k2 * c + k1 * s).to(K.dtype.element_ty).to(KC.dtype.element_ty)
    kc_ptr = KC + slot * skc_s + idx * skc_c + hk * skc_h + cols[None, :]
    tl.store(kc_ptr, kr1, mask=mk)
    tl.store(kc_ptr + HALF, kr2, mask=mk)
    v_ptr = V + t * sv_t + hk * sv_h + cols[None, :]
    vc_ptr = VC + slot * svc_s + idx * svc_c + hk * svc_h + cols[None, :]
    tl.store(vc_ptr, tl.load(v_ptr, mask=mk).to(VC.dtype.element_ty), mask=mk)
    tl.store(vc_ptr + HALF, tl.load(v_ptr + HALF, mask=mk).to(VC.dtype.element_ty), mask=mk)


def rope_cache_write(
    q: torch.Tensor,  # [T, nq, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    cos_table: torch.Tensor,  # [P, d/2] fp32
    sin_table: torch.Tensor,  # [P, d/2] fp32
    positions: torch.Tensor,  # [T] int
    slot_ids: torch.Tensor,  # [T] int
    k_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
    v_cache: torch.Tensor,  # [S+1, C, nkv, d], written in place
) -> torch.Tensor:
    """Triton rope_cache_write_ref; returns the rotated q [T, nq, d] (contiguous).

    Requires that no two tokens target the same (slot, position mod C) (see the module docstring).
    Positions must lie in [0, P): they are not bounds-checked on the device (no host sync)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("rope_cache_write: q, k, v must be [T, heads, d]")
    t, nq, d = q.shape
    nkv = k.shape[1]
    if k.shape != (t, nkv, d) or v.shape != (t, nkv, d):
        raise ValueError(
            f"rope_cache_write: k {tuple(k.shape)} and v {tuple(v.shape)} must be [{t}, nkv, {d}]"
        )
    if d % 2:
        raise ValueError(f"rope_cache_write: head_dim must be even, got {d}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"rope_cache_write: q/k/v dtypes differ: {q.dtype} {k.dtype} {v.dtype}")
    if any(x.stride(2) != 1 for x in (q, k, v)):
        raise ValueError("rope_cache_write: q, k, v need a contiguous last dimension")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != d // 2 or table.dtype != torch.float32:
            raise ValueError(f"rope_cache_write: {name} must be fp32 [P, {d // 2}]")
        if not table.is_contiguous():
            raise ValueError(f"rope_cache_write: {name} must be contiguous")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[2:] != (nkv, d) or cache.stride(3) != 1:
            raise ValueError(
                f"rope_cache_write: {name} must be [S+1, C, {nkv}, {d}] with a contiguous last "
                f"dimension, got {tuple(cache.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError("rope_cache_write: k_cache and v_cache shapes differ")
    if positions.shape != (t,) or slot_ids.shape != (t,):
        raise ValueError(f"rope_cache_write: positions and slot_ids must be [{t}]")
    if positions.dtype.is_floating_point or slot_ids.dtype.is_floating_point:
        raise ValueError("rope_cache_write: positions and slot_ids must be integer tensors")
    tensors = (k, v, cos_table, sin_table, positions, slot_ids, k_cache, v_cache)
    if any(x.device != q.device for x in tensors):
        raise ValueError("rope_cache_write: all tensors must be on one device")
    q_out = torch.empty((t, nq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    jit["_rope_cache_write_kernel"][(t,)](
        q, k, v, cos_table, sin_table, positions.contiguous(), slot_ids.contiguous(),
        k_cache, v_cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q_out.stride(0), q_out.stride(1),
        k_cache.shape[1], nq, nkv,
        HALF=d // 2, NQ_P=triton.next_power_of_2(nq), NKV_P=triton.next_power_of_2(nkv),
        BLOCK_D=triton.next_power_of_2(d // 2), num_warps=4, **pdl.launch_args(q.device),
    )
    return q_out
