"""The fused router's routing for one token (route_fused(..., fast_one=True), T == 1), in the
last-arriving program's registers: no logits round trip, no histogram, no ranking or tile scans.

One token's plan is k pairs q = 0 … k−1 (pair q = its q-th choice), so every plan field is a
[k]- or [k, k]-sized function of the k chosen expert ids e_q:
    first[q] = #{q' : e_q' < e_q},  rank[q] = #{q' < q : e_q' = e_q},  pos[q] = first[q] + rank[q]
    sorted_pair[pos[q]] = q,        counts[e] = #{q : e_q = e}
and pair q opens a tile where rank[q] % BLOCK_M == 0 (tile index: the opening pairs at lower
rows), ending at min(pos[q] + BLOCK_M, first[q] + counts[e_q]). Repeated ids (only from NaN
logits, which all map to expert E − 1) are handled like any other, so the plan equals
kernels/moe_routing._route_block's bit for bit: the top-k and softmax below are its operations
on the same [1, E_PAD] / [1, K_PAD] shapes, on the logits rounded to x's dtype as it reads them.
"""

from __future__ import annotations

import triton.language as tl

from kernels.jit import KernelSet

jit = KernelSet(globals())


@jit
def _route_one(
    logit, E, IDS, W, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, MAX_TILES,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """logit: [1, E_PAD] fp32, the token's logits already rounded to x's dtype, −inf past E.
    Needs MAX_TILES ≤ 2·K_PAD (max_tiles(1, k, E, BLOCK_M) ≤ 2k)."""
    cols = tl.arange(0, E_PAD)
    kc = tl.arange(0, K_PAD)
    vals = tl.full([1, K_PAD], float("-inf"), tl.float32)
    ids2 = tl.full([1, K_PAD], E_PAD, tl.int32)  # [1, K_PAD] choice j → expert
    for j in tl.static_range(K):  # _route_block's selection: equal logits → lower id
        m = tl.max(logit, axis=1)
        idx = tl.min(tl.where(logit == m[:, None], cols[None, :], E_PAD), axis=1)
        idx = tl.minimum(idx, E - 1)
        vals = tl.where(kc[None, :] == j, m[:, None], vals)
        ids2 = tl.where(kc[None, :] == j, idx[:, None], ids2)
        logit = tl.where(cols[None, :] == idx[:, None], float("-inf"), logit)
    top = tl.max(vals, axis=1)
    p = tl.where(kc[None, :] < K, tl.exp(vals - top[:, None]), 0.0)
    w = p / tl.sum(p, axis=1)[:, None]
    kmask = kc < K
    tl.store(IDS + kc[None, :], ids2, mask=kmask[None, :])
    tl.store(W + kc[None, :], w, mask=kmask[None, :])
    ids = tl.sum(ids2, axis=0)  # [K_PAD] (one row)
    other = kmask[None, :]  # [1, K_PAD] column q' is a real pair
    first = tl.sum(((ids[None, :] < ids[:, None]) & other).to(tl.int32), axis=1)  # [K_PAD]
    same = (ids[None, :] == ids[:, None]) & other  # [K_PAD, K_PAD]
    cnt = tl.sum(same.to(tl.int32), axis=1)
    rank = tl.sum((same & (kc[None, :] < kc[:, None])).to(tl.int32), axis=1)
    pos = first + rank
    tl.store(POS + kc, pos, mask=kmask)
    tl.store(SORTED + pos, kc, mask=kmask)
    hits = (ids[:, None] == cols[None, :]) & kmask[:, None]  # [K_PAD, E_PAD]
    tl.store(COUNTS + cols, tl.sum(hits.to(tl.int32), axis=0), mask=cols < E)
    opens = kmask & (rank % BLOCK_M == 0)  # [K_PAD] pair q starts a tile
    tile = tl.sum((opens[None, :] & (pos[None, :] < pos[:, None])).to(tl.int32), axis=1)
    num = tl.sum(opens.to(tl.int32), axis=0)
    tl.store(NUM_TILES, num)
    tl.store(TILE_E + tile, ids, mask=opens)
    tl.store(TILE_START + tile, pos, mask=opens)
    tl.store(TILE_END + tile, tl.minimum(pos + BLOCK_M, first + cnt), mask=opens)
    i = tl.arange(0, 2 * K_PAD)  # the unused slots num … MAX_TILES − 1
    rest = (i >= num) & (i < MAX_TILES)
    tl.store(TILE_E + i, tl.full([2 * K_PAD], -1, tl.int32), mask=rest)
    tl.store(TILE_START + i, tl.zeros([2 * K_PAD], tl.int32), mask=rest)
    tl.store(TILE_END + i, tl.zeros([2 * K_PAD], tl.int32), mask=rest)


__all__: list[str] = []
