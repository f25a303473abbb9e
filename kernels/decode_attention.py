"""Decode attention: one query token per slot over that slot's cache, GQA, sinks, sliding window.

Row b is the query of slot slot_ids[b] at position positions[b]; the cache already holds positions
0 … positions[b] of that slot (index i mod C). Same math as prefill_attention (see there):
    o = Σᵢ exp(sᵢ − m) vᵢ / (exp(sink − m) + Σᵢ exp(sᵢ − m)),  i ∈ [lo(p), p]
The kernel reads only positions up to each slot's own length and splits long contexts across
programs, merging partial softmaxes (flash-decoding, https://pytorch.org/blog/flash-decoding/).
"""

from __future__ import annotations

import torch

from kernels.prefill_attention import attention_core_ref, cached_positions


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
