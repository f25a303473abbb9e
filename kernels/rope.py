"""Rotary position embedding (NeoX halves, YaRN-scaled table) fused with the K/V cache write.

For a head vector x = [x₁ | x₂] (halves of d/2) at position p:
    rope(x) = [x₁·cos − x₂·sin | x₂·cos + x₁·sin],  cos/sin = c·cos(p·ω), c·sin(p·ω)
with ω the YaRN-interpolated inverse frequencies and c the YaRN concentration (runtime/rope.py
builds the table once). The rotated keys and the values of token t are written into the slot's cache
row at index `p mod capacity` (full layers: capacity ≥ context, so the index is p; sliding-window
layers: a ring buffer).
YaRN: Peng et al., https://arxiv.org/abs/2309.00071; RoFormer: https://arxiv.org/abs/2104.09864
"""

from __future__ import annotations

import torch


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
