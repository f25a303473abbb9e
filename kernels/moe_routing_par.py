"""MoE routing over many small token blocks: the plan of kernels/moe_routing.route, bit for bit,
in two short launches whose work per program does not grow with the batch.

moe_routing.route cuts the tokens into blocks of up to 256 (E = 32) and ranks each block's pairs
in 64-pair steps, one after the other: 16 serial steps per program, and a single program for
every batch up to 256 tokens (28 µs on an H100 at 256 tokens, in a graph); its second launch
also reads every earlier block's counts one row per loop trip. Here:
- `_topk_count_kernel`, one program per BLOCK_T ≤ 32 tokens: top-k, softmax over the k,
  the block's pairs counted per expert (HIST[blk]);
- `_rank_kernel`, one program per block: every block's counts in one [blocks, E] load (totals
  and the blocks before it), its ≤ 128 pairs ranked in ≤ 4 steps (pos, sorted_pair), and its
  share of the tile table (program 0 also writes counts and num_tiles).
A batch of one block (≤ 32 tokens at k = 4) does both in one launch.

Same math as moe_routing (top-k ties → lower expert id, NaN rows still name a real expert); the
softmax denominator is summed j = 0, 1, …, k−1 in that order whatever the block shape (the
interpreter's order of moe_routing too). The plan's buffers are views of one int32 allocation
(16-byte aligned segments, as the GEMMs' pointer specialization expects), sizes fixed by
(T, E, k, BLOCK_M): no host sync, graph-capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.jit import KernelSet, interpret_forced
from kernels.moe_routing import RoutingPlan, max_tiles

jit = KernelSet(globals())

_ELEMS = 4096  # register budget of a program's largest tensor ([rows, E_PAD] int32/fp32)
_PAIRS = 128  # pairs per token block: at most 4 ranking steps


@jit
def _topk_block(
    blk, LOGITS, stride_l, T, E, IDS, W, HIST,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Top-k + softmax of token block `blk` (→ IDS, W) and its pairs per expert (→ HIST[blk])."""
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    kc = tl.arange(0, K_PAD)
    ptrs = LOGITS + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
    logit = tl.load(ptrs, mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf"))
    logit = logit.to(tl.float32)  # [BLOCK_T, E_PAD]
    vals = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    top = tl.zeros([BLOCK_T], dtype=tl.float32)
    den = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        m = tl.max(logit, axis=1)
        idx = tl.min(tl.where(logit == m[:, None], cols[None, :], E_PAD), axis=1)
        idx = tl.minimum(idx, E - 1)  # NaN rows still name a real expert (never out of bounds)
        tl.store(IDS + rows * K + j, idx, mask=rmask)
        if j == 0:
            top = tl.where(rmask, m, 0.0)  # padded rows: no −inf − (−inf)
        den += tl.exp(m - top)  # fixed order j = 0 … k−1, whatever the layout
        vals = tl.where(kc[None, :] == j, m[:, None], vals)
        hit = cols[None, :] == idx[:, None]  # [BLOCK_T, E_PAD]
        hist += tl.sum((hit & rmask[:, None]).to(tl.int32), axis=0)
        logit = tl.where(hit, float("-inf"), logit)
    p = tl.where(kc[None, :] < K, tl.exp(vals - top[:, None]), 0.0)
    w = p / tl.where(rmask, den, 1.0)[:, None]
    tl.store(W + rows[:, None] * K + kc[None, :], w, mask=rmask[:, None] & (kc < K)[None, :])
    tl.store(HIST + blk * E_PAD + cols, hist)


@jit
def _rank_block(
    blk, nblocks, IDS, HIST, POS, SORTED, TK,
    E_PAD: tl.constexpr, NB_CHUNK: tl.constexpr, CHUNK: tl.constexpr, PAIRS: tl.constexpr,
):
    """Rows of block `blk`'s pairs (→ POS, SORTED) after all earlier blocks' pairs of the same
    expert; returns every expert's total."""
    cols = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for b0 in range(0, nblocks, NB_CHUNK):  # one trip up to NB_CHUNK blocks
        b = b0 + tl.arange(0, NB_CHUNK)
        h = tl.load(HIST + b[:, None] * E_PAD + cols[None, :], mask=(b < nblocks)[:, None],
                    other=0)  # [NB_CHUNK, E_PAD]
        totals += tl.sum(h, axis=0)
        before += tl.sum(tl.where((b < blk)[:, None], h, 0), axis=0)
    base = tl.cumsum(totals, axis=0) - totals + before  # [E_PAD] next row of each expert
    c = tl.arange(0, CHUNK)
    earlier = c[None, :] < c[:, None]  # [CHUNK, CHUNK]: column pair precedes row pair
    for c0 in tl.static_range(0, PAIRS, CHUNK):
        q = blk * PAIRS + c0 + c
        valid = (c0 + c < PAIRS) & (q < TK)  # k not a power of two: the last step is partial
        e = tl.load(IDS + q, mask=valid, other=-1)
        rank = tl.sum(((e[None, :] == e[:, None]) & earlier).to(tl.int32), axis=1)  # [CHUNK]
        onehot = e[:, None] == cols[None, :]  # [CHUNK, E_PAD]
        row = tl.sum(tl.where(onehot, base[None, :], 0), axis=1) + rank
        tl.store(POS + q, row, mask=valid)
        tl.store(SORTED + row, q, mask=valid)
        base += tl.sum(onehot.to(tl.int32), axis=0)
    return totals


@jit
def _tiles_slice(
    totals, lo, hi, head, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, E,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Tile table entries lo … hi−1 from the per-expert totals; head: also counts, num_tiles."""
    cols = tl.arange(0, E_PAD)
    offset = tl.cumsum(totals, axis=0) - totals
    ntiles = (totals + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(ntiles, axis=0)  # [E_PAD] inclusive
    tiles_begin = tiles_end - ntiles
    num = tl.sum(ntiles, axis=0)
    tl.store(COUNTS + cols, totals, mask=(cols < E) & head)
    tl.store(NUM_TILES, num, mask=head)
    for i0 in range(lo, hi, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        im = i < hi
        # expert of tile i = number of experts whose tiles all lie before i
        e = tl.sum((tiles_end[None, :] <= i[:, None]).to(tl.int32), axis=1)
        sel = cols[None, :] == e[:, None]  # [BLOCK_I, E_PAD]
        local = i - tl.sum(tl.where(sel, tiles_begin[None, :], 0), axis=1)
        first = tl.sum(tl.where(sel, offset[None, :], 0), axis=1)
        last = tl.sum(tl.where(sel, (offset + totals)[None, :], 0), axis=1)
        start = first + local * BLOCK_M
        live = i < num
        tl.store(TILE_E + i, tl.where(live, e, -1), mask=im)
        tl.store(TILE_START + i, tl.where(live, start, 0), mask=im)
        tl.store(TILE_END + i, tl.where(live, tl.minimum(start + BLOCK_M, last), 0), mask=im)


@jit(do_not_specialize=("T", "MAX_TILES"))
def _topk_count_kernel(
    LOGITS, stride_l, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END,
    NUM_TILES, MAX_TILES,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, FUSED: tl.constexpr,
    PDL: tl.constexpr,
):
    """Launch 1 (FUSED: the whole plan of a single token block)."""
    if PDL:  # programmatic dependent launch: see kernels/moe_gemm_kernels._pdl_start
        gdc_wait()
        gdc_launch_dependents()
    blk = tl.program_id(0)
    _topk_block(blk, LOGITS, stride_l, T, E, IDS, W, HIST, K, K_PAD, E_PAD, BLOCK_T)
    if FUSED:
        tl.debug_barrier()  # the ids and counts above are read back by other threads
        totals = _rank_block(0, 1, IDS, HIST, POS, SORTED, T * K, E_PAD, 2, CHUNK, BLOCK_T * K)
        _tiles_slice(totals, 0, MAX_TILES, True, COUNTS, TILE_E, TILE_START, TILE_END,
                     NUM_TILES, E, E_PAD, BLOCK_M, BLOCK_I)


@jit(do_not_specialize=("nblocks", "TK", "MAX_TILES"))
def _rank_kernel(
    IDS, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, nblocks, TK, E,
    MAX_TILES,
    E_PAD: tl.constexpr, NB_CHUNK: tl.constexpr, CHUNK: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr,
):
    """Launch 2: block `program_id`'s ranks and its share of the tile table."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    blk = tl.program_id(0)
    totals = _rank_block(blk, nblocks, IDS, HIST, POS, SORTED, TK, E_PAD, NB_CHUNK, CHUNK, PAIRS)
    share = tl.cdiv(MAX_TILES, nblocks)
    lo = blk * share
    _tiles_slice(totals, lo, tl.minimum(lo + share, MAX_TILES), blk == 0, COUNTS, TILE_E,
                 TILE_START, TILE_END, NUM_TILES, E, E_PAD, BLOCK_M, BLOCK_I)


@dataclass(frozen=True)
class ParLaunch:
    """Block sizes for (T, E, k, BLOCK_M) and where each plan field lies in the one buffer."""

    e_pad: int
    block_t: int
    nblocks: int
    chunk: int
    nb_chunk: int
    block_i: int
    n_tiles: int
    sizes: tuple[int, ...]  # int32 segments of the buffer: the fields and pads to 16 bytes
    at: tuple[int, ...]  # which segments are the fields
    topk_warps: int
    total: int

    @classmethod
    def of(cls, t: int, e: int, top_k: int, block_m: int) -> ParLaunch:
        e_pad = triton.next_power_of_2(e)
        k_pad = triton.next_power_of_2(top_k)
        block_t = max(1, min(triton.next_power_of_2(max(t, 1)), _ELEMS // e_pad,
                             _PAIRS // k_pad))
        nblocks = max(1, triton.cdiv(t, block_t))
        pairs = triton.next_power_of_2(block_t * top_k)
        chunk = max(2, min(pairs, 64, _ELEMS // e_pad))
        # Past one block every constexpr is fixed by (E, k, BLOCK_M): one compiled variant per
        # model for all larger batches (the engine compiles each at warm-up).
        nb_chunk = max(2, _ELEMS // e_pad)
        n_tiles = max_tiles(t, top_k, e, block_m)
        block_i = 32 if nblocks > 1 else max(16, min(triton.next_power_of_2(max(n_tiles, 1)),
                                                     _ELEMS // e_pad))
        fields = (t * top_k,) * 4 + (e,) + (n_tiles,) * 3 + (1, nblocks * e_pad)
        sizes: list[int] = []
        at: list[int] = []
        for n in fields:  # each field 16-byte aligned: the kernels' pointer specialization
            at.append(len(sizes))
            sizes += [n] + ([-n % 4] if n % 4 else [])  # (a view per pad costs host time)
        return cls(e_pad, block_t, nblocks, chunk, nb_chunk, block_i, n_tiles, tuple(sizes),
                   tuple(at), 1 if block_t * e_pad <= 1024 else 4, sum(sizes))


_launch = functools.lru_cache(maxsize=1024)(ParLaunch.of)


def route_par(logits: torch.Tensor, top_k: int, block_m: int, pdl: bool = False) -> RoutingPlan:
    """moe_routing.route's plan (same bits) from router logits [T, E]; see the module doc."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"route: logits must be [T, E] with unit column stride, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    t, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"route: top_k must be in [1, {e}], got {top_k}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"route: block_m must be a power of two, got {block_m}")
    lc = _launch(t, e, top_k, block_m)
    buf = torch.empty(lc.total, dtype=torch.int32, device=logits.device)
    seg = buf.split(lc.sizes)
    w, ids, pos, srt, counts, te, ts, tn, num, hist = (seg[i] for i in lc.at)
    plan = RoutingPlan(
        weights=w.view(torch.float32).view(t, top_k), experts=ids.view(t, top_k), counts=counts,
        pos=pos, sorted_pair=srt, tile_expert=te, tile_start=ts, tile_end=tn, num_tiles=num,
        block_m=block_m,
    )
    if t == 0:
        buf.zero_()
        return plan
    pdl = pdl and logits.is_cuda and not interpret_forced()
    fused = lc.nblocks == 1
    jit["_topk_count_kernel"][(lc.nblocks,)](
        logits, logits.stride(0), t, e, plan.experts, plan.weights, hist, pos, srt, counts, te,
        ts, tn, num, lc.n_tiles,
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=lc.e_pad, BLOCK_T=lc.block_t,
        # (CHUNK, BLOCK_M, BLOCK_I: the fused launch's; fixed otherwise, not to compile variants)
        CHUNK=lc.chunk if fused else 2, BLOCK_M=block_m if fused else 16,
        BLOCK_I=lc.block_i if fused else 16, FUSED=fused, PDL=pdl,
        num_warps=4 if fused else lc.topk_warps, launch_pdl=pdl,
    )
    if not fused:
        jit["_rank_kernel"][(lc.nblocks,)](
            plan.experts, hist, pos, srt, counts, te, ts, tn, num, lc.nblocks, t * top_k, e,
            lc.n_tiles,
            E_PAD=lc.e_pad, NB_CHUNK=lc.nb_chunk, CHUNK=lc.chunk, PAIRS=lc.block_t * top_k,
            BLOCK_M=block_m, BLOCK_I=lc.block_i, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return plan


__all__ = ["ParLaunch", "route_par"]
