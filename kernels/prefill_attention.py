"""Attention of packed variable-length query chunks over each sequence's slot cache.

Sequence n owns query rows cu_seqlens[n] … cu_seqlens[n+1]−1 at positions start_pos[n] + i and reads
keys/values of positions 0 … its own position from cache row slot[n] (already written, this chunk
included). For query head h (KV head h // (nq/nkv)) at position p:
    sᵢ = q·kᵢ · scale                    for key positions i in [lo(p), p], lo = max(0, p − W + 1)
                                          with a sliding window W, else 0
    o  = Σᵢ exp(sᵢ − m) vᵢ / (exp(sink_h − m) + Σᵢ exp(sᵢ − m)),  m = max(sink_h, maxᵢ sᵢ)
The learned sink joins the softmax denominator and contributes no value (gpt-oss).
Cache index of position i is i mod C (ring buffer on sliding layers; C ≥ W + chunk length − 1).
FlashAttention-2: https://arxiv.org/abs/2307.08691; sinks: https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

import torch


def attention_core_ref(
    q: torch.Tensor,  # [n, nq, d] queries at positions qpos
    k: torch.Tensor,  # [L, nkv, d] keys at positions kpos
    v: torch.Tensor,  # [L, nkv, d]
    qpos: torch.Tensor,  # [n]
    kpos: torch.Tensor,  # [L]; negative = empty
    sinks: torch.Tensor,  # [nq] fp32
    window: int,  # 0 = full causal
    scale: float,
) -> torch.Tensor:
    nq, nkv = q.shape[1], k.shape[1]
    rep = nq // nkv
    kf = k.float().repeat_interleave(rep, dim=1)  # [L, nq, d]
    vf = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.float(), kf) * scale  # [nq, n, L]
    allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0)
    if window > 0:
        allowed &= kpos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~allowed[None], float("-inf"))
    sink = sinks.float()[:, None, None].expand(nq, s.shape[1], 1)
    p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]  # [nq, n, L]
    return torch.einsum("hnl,lhd->nhd", p, vf).to(q.dtype)


def cached_positions(cap: int, last_pos: int, device: torch.device) -> torch.Tensor:
    """Position held at each cache index once positions 0 … last_pos were written (−1: empty)."""
    i = torch.arange(cap, device=device)
    pos = last_pos - ((last_pos - i) % cap)
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


def prefill_attention_ref(
    q: torch.Tensor,  # [T, nq, d] (rotated)
    k_cache: torch.Tensor,  # [S+1, C, nkv, d]
    v_cache: torch.Tensor,  # [S+1, C, nkv, d]
    cu_seqlens: list[int] | torch.Tensor,  # [N+1] query row offsets
    seq_slots: list[int] | torch.Tensor,  # [N]
    seq_start_pos: list[int] | torch.Tensor,  # [N] position of each sequence's first query row
    sinks: torch.Tensor,  # [nq] fp32
    window: int,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = [int(x) for x in cu_seqlens]
    cap = k_cache.shape[1]
    for n, (slot, start) in enumerate(zip(seq_slots, seq_start_pos, strict=True)):
        a, b = cu[n], cu[n + 1]
        if a == b:
            continue
        slot, start = int(slot), int(start)
        qpos = torch.arange(start, start + (b - a), device=q.device)
        kpos = cached_positions(cap, start + (b - a) - 1, q.device)
        out[a:b] = attention_core_ref(
            q[a:b], k_cache[slot], v_cache[slot], qpos, kpos, sinks, window, scale
        )
    return out
