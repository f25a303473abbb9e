"""MoE routing on the device: top-k of the router logits, softmax over the k selected, and the
token/expert pairs grouped by expert for the grouped GEMMs.

    (v, e) = top-k(logits[t])   k largest logits, largest first (equal logits: lower expert id)
    w      = softmax(v)         fp32, over the k selected values only
Pair q = t·k + j is token t's j-th choice. Pairs are ordered by expert with a stable counting sort:
    count[e]  = #{q : e_q = e},   offset[e] = Σ_{e' < e} count[e']
    pos[q]    = offset[e_q] + #{q' < q : e_q' = e_q},   sorted_pair[pos[q]] = q
and the sorted rows are cut into tiles of BLOCK_M rows that never straddle two experts
(tiles[e] = ⌈count[e] / BLOCK_M⌉; tile i of expert e covers rows offset[e] + i·BLOCK_M …).
Every output has a size fixed by (T, k, E, BLOCK_M) (unused tile slots hold expert −1), nothing is
read back to the host, and the order is deterministic: the launches can be captured in a CUDA graph.

Tokens are cut into blocks of BLOCK_T; each block's program selects and counts its own pairs, and
ranks them after the counts of all blocks before it. A single block does everything in one launch
(decode); more blocks take a second launch, after the first has written every block's counts.
Switch Transformer routing: https://arxiv.org/abs/2101.03961
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.jit import KernelSet, interpret_forced
from kernels.moe_ref import route_ref

jit = KernelSet(globals())

# Register budgets (elements of the largest tensors): beyond them the kernels spill.
_TOPK_ELEMS = 8192  # [BLOCK_T, E] logits of one program's top-k
_PLACE_ELEMS = 4096  # [CHUNK, max(CHUNK, E)] comparisons of one ranking step


@dataclass(frozen=True)
class RoutingPlan:
    weights: torch.Tensor  # [T, k] fp32 router weights, largest logit first
    experts: torch.Tensor  # [T, k] int32 expert ids
    counts: torch.Tensor  # [E] int32 pairs per expert
    pos: torch.Tensor  # [T·k] int32: pair q → its row in expert order
    sorted_pair: torch.Tensor  # [T·k] int32: row → pair q (token = q // k)
    tile_expert: torch.Tensor  # [max_tiles] int32, −1 past the last tile
    tile_start: torch.Tensor  # [max_tiles] int32 first row of the tile
    tile_end: torch.Tensor  # [max_tiles] int32 one past its last row
    num_tiles: torch.Tensor  # [1] int32 tiles in use (the others hold expert −1)
    block_m: int

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.shape[0]


def max_tiles(tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """Worst case of Σ_e ⌈count[e] / BLOCK_M⌉ over any routing of T·k pairs."""
    pairs = tokens * top_k
    return triton.cdiv(pairs, block_m) + min(num_experts, pairs)


@jit
def _place_block(
    blk, nblocks, IDS, HIST, POS, SORTED, TK,
    E_PAD: tl.constexpr, CHUNK: tl.constexpr, PAIRS_PER_BLOCK: tl.constexpr,
):
    """Ranks block `blk`'s pairs after every earlier block's; returns the per-expert totals.
    CHUNK pairs at a time, each ranked among the chunk's earlier pairs of its expert with a
    [CHUNK, CHUNK] comparison (reductions only: no scan along a tensor's slow axis, which is
    what spills)."""
    cols = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for b in range(0, nblocks):
        h = tl.load(HIST + b * E_PAD + cols)
        totals += h
        before += tl.where(b < blk, h, 0)
    base = tl.cumsum(totals, axis=0) - totals + before  # [E_PAD] next row of each expert
    c = tl.arange(0, CHUNK)
    earlier = c[None, :] < c[:, None]  # [CHUNK, CHUNK]: column pair precedes row pair
    for c0 in range(0, PAIRS_PER_BLOCK, CHUNK):
        q = blk * PAIRS_PER_BLOCK + c0 + c
        valid = (c0 + c < PAIRS_PER_BLOCK) & (q < TK)
        e = tl.load(IDS + q, mask=valid, other=-1)
        rank = tl.sum(((e[None, :] == e[:, None]) & earlier).to(tl.int32), axis=1)  # [CHUNK]
        onehot = e[:, None] == cols[None, :]  # [CHUNK, E_PAD]
        row = tl.sum(tl.where(onehot, base[None, :], 0), axis=1) + rank
        tl.store(POS + q, row, mask=valid)
        tl.store(SORTED + row, q, mask=valid)
        base += tl.sum(onehot.to(tl.int32), axis=0)
    return totals


@jit
def _write_tiles(
    totals, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, E, MAX_TILES,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):
    cols = tl.arange(0, E_PAD)
    tl.store(COUNTS + cols, totals, mask=cols < E)
    offset = tl.cumsum(totals, axis=0) - totals
    ntiles = (totals + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(ntiles, axis=0)  # [E_PAD] inclusive
    tiles_begin = tiles_end - ntiles
    num = tl.sum(ntiles, axis=0)
    tl.store(NUM_TILES, num)
    for i0 in range(0, MAX_TILES, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        # expert of tile i = number of experts whose tiles all lie before i
        e = tl.sum((tiles_end[None, :] <= i[:, None]).to(tl.int32), axis=1)
        sel = cols[None, :] == e[:, None]  # [BLOCK_I, E_PAD]
        local = i - tl.sum(tl.where(sel, tiles_begin[None, :], 0), axis=1)
        first = tl.sum(tl.where(sel, offset[None, :], 0), axis=1)
        last = tl.sum(tl.where(sel, (offset + totals)[None, :], 0), axis=1)
        start = first + local * BLOCK_M
        live = i < num
        tl.store(TILE_E + i, tl.where(live, e, -1), mask=i < MAX_TILES)
        tl.store(TILE_START + i, tl.where(live, start, 0), mask=i < MAX_TILES)
        tl.store(TILE_END + i, tl.where(live, tl.minimum(start + BLOCK_M, last), 0),
                 mask=i < MAX_TILES)


@jit
def _route_block(
    blk, LOGITS, stride_l, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END,
    NUM_TILES, MAX_TILES,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, FUSED: tl.constexpr,
):
    """Top-k + softmax of token block `blk`, its per-expert counts; FUSED (a single block):
    also the ranks and the tile table."""
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    kc = tl.arange(0, K_PAD)
    ptrs = LOGITS + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
    logit = tl.load(ptrs, mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf"))
    logit = logit.to(tl.float32)  # [BLOCK_T, E_PAD]
    vals = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(logit, axis=1)
        idx = tl.min(tl.where(logit == m[:, None], cols[None, :], E_PAD), axis=1)
        idx = tl.minimum(idx, E - 1)  # NaN rows still name a real expert (never out of bounds)
        tl.store(IDS + rows * K + j, idx, mask=rmask)
        vals = tl.where(kc[None, :] == j, m[:, None], vals)
        hit = cols[None, :] == idx[:, None]  # [BLOCK_T, E_PAD]
        hist += tl.sum((hit & rmask[:, None]).to(tl.int32), axis=0)
        logit = tl.where(hit, float("-inf"), logit)
    top = tl.where(rmask, tl.max(vals, axis=1), 0.0)  # padded rows: no −inf − (−inf)
    p = tl.where(kc[None, :] < K, tl.exp(vals - top[:, None]), 0.0)
    w = p / tl.where(rmask, tl.sum(p, axis=1), 1.0)[:, None]
    wmask = rmask[:, None] & (kc < K)[None, :]
    tl.store(W + rows[:, None] * K + kc[None, :], w, mask=wmask)
    tl.store(HIST + blk * E_PAD + cols, hist)
    if FUSED:
        tl.debug_barrier()  # the ids and counts above are read back by other threads
        totals = _place_block(0, 1, IDS, HIST, POS, SORTED, T * K, E_PAD, CHUNK, BLOCK_T * K)
        _write_tiles(
            totals, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, E, MAX_TILES, E_PAD,
            BLOCK_M, BLOCK_I,
        )


@jit(do_not_specialize=("T", "MAX_TILES"))
def _topk_kernel(
    LOGITS, stride_l, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END,
    NUM_TILES, MAX_TILES,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, FUSED: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch: see kernels/moe_gemm_kernels._pdl_start
        gdc_wait()
        gdc_launch_dependents()
    _route_block(
        tl.program_id(0), LOGITS, stride_l, T, E, IDS, W, HIST, POS, SORTED, COUNTS, TILE_E,
        TILE_START, TILE_END, NUM_TILES, MAX_TILES, K, K_PAD, E_PAD, BLOCK_T, CHUNK, BLOCK_M,
        BLOCK_I, FUSED,
    )


@jit(do_not_specialize=("nblocks", "TK", "MAX_TILES"))
def _place_kernel(
    IDS, HIST, POS, SORTED, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, nblocks, TK, E,
    MAX_TILES,
    E_PAD: tl.constexpr, CHUNK: tl.constexpr, PAIRS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    blk = tl.program_id(0)
    totals = _place_block(blk, nblocks, IDS, HIST, POS, SORTED, TK, E_PAD, CHUNK,
                          PAIRS_PER_BLOCK)
    if blk == 0:
        _write_tiles(
            totals, COUNTS, TILE_E, TILE_START, TILE_END, NUM_TILES, E, MAX_TILES, E_PAD,
            BLOCK_M, BLOCK_I,
        )


@dataclass(frozen=True)
class RouteLaunch:
    """Block sizes of the routing kernels for (T, E, k) and the plan's fixed-size buffers."""

    e_pad: int
    block_t: int
    nblocks: int
    chunk: int  # pairs ranked per step
    block_i: int
    num_warps: int

    @classmethod
    def of(cls, t: int, e: int, top_k: int, n_tiles: int) -> RouteLaunch:
        e_pad = triton.next_power_of_2(e)
        block_t = max(1, min(triton.next_power_of_2(max(t, 1)), _TOPK_ELEMS // e_pad))
        pairs = triton.next_power_of_2(block_t * top_k)
        chunk = max(2, min(pairs, 64, _PLACE_ELEMS // e_pad))
        # Small problems in one warp: the reductions need no cross-warp barriers.
        return cls(e_pad, block_t, max(1, triton.cdiv(t, block_t)), chunk,
                   max(16, min(triton.next_power_of_2(n_tiles), _PLACE_ELEMS // e_pad)),
                   1 if block_t * e_pad <= 1024 else 4)

    def constexprs(self, top_k: int, block_m: int) -> dict:
        return dict(K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=self.e_pad,
                    BLOCK_T=self.block_t, CHUNK=self.chunk, BLOCK_M=block_m,
                    BLOCK_I=self.block_i, FUSED=self.nblocks == 1)


def new_plan(t: int, e: int, top_k: int, block_m: int, device: torch.device) -> RoutingPlan:
    """Uninitialized plan buffers (sizes fixed by T, E, k, BLOCK_M); T = 0 is already valid."""
    if not 1 <= top_k <= e:
        raise ValueError(f"route: top_k must be in [1, {e}], got {top_k}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"route: block_m must be a power of two, got {block_m}")
    i32, n_tiles = torch.int32, max_tiles(t, top_k, e, block_m)
    plan = RoutingPlan(
        weights=torch.empty(t, top_k, dtype=torch.float32, device=device),
        experts=torch.empty(t, top_k, dtype=i32, device=device),
        counts=torch.empty(e, dtype=i32, device=device),
        pos=torch.empty(t * top_k, dtype=i32, device=device),
        sorted_pair=torch.empty(t * top_k, dtype=i32, device=device),
        tile_expert=torch.empty(n_tiles, dtype=i32, device=device),
        tile_start=torch.empty(n_tiles, dtype=i32, device=device),
        tile_end=torch.empty(n_tiles, dtype=i32, device=device),
        num_tiles=torch.empty(1, dtype=i32, device=device),
        block_m=block_m,
    )
    if t == 0:
        plan.counts.zero_()
        plan.num_tiles.zero_()
    return plan


def plan_outputs(plan: RoutingPlan) -> tuple[torch.Tensor, ...]:
    """The kernels' output pointers after (IDS, W, HIST): POS … NUM_TILES."""
    return (plan.pos, plan.sorted_pair, plan.counts, plan.tile_expert, plan.tile_start,
            plan.tile_end, plan.num_tiles)


def route(logits: torch.Tensor, top_k: int, block_m: int, pdl: bool = False) -> RoutingPlan:
    """Router logits [T, E] (any float dtype) → RoutingPlan with tiles of `block_m` rows.
    pdl: launch with programmatic dependent launch (CUDA, sm_90+), see moe_gemm.pdl_args."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"route: logits must be [T, E] with unit column stride, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    t, e = logits.shape
    plan = new_plan(t, e, top_k, block_m, logits.device)
    if t == 0:
        return plan
    lc = RouteLaunch.of(t, e, top_k, plan.max_tiles)
    hist = torch.empty(lc.nblocks, lc.e_pad, dtype=torch.int32, device=logits.device)
    pdl = pdl and logits.is_cuda and not interpret_forced()
    jit["_topk_kernel"][(lc.nblocks,)](
        logits, logits.stride(0), t, e, plan.experts, plan.weights, hist, *plan_outputs(plan),
        plan.max_tiles, **lc.constexprs(top_k, block_m), num_warps=lc.num_warps, PDL=pdl,
        launch_pdl=pdl,
    )
    if lc.nblocks > 1:
        jit["_place_kernel"][(lc.nblocks,)](
            plan.experts, hist, *plan_outputs(plan), lc.nblocks, t * top_k, e, plan.max_tiles,
            E_PAD=lc.e_pad, CHUNK=lc.chunk, PAIRS_PER_BLOCK=lc.block_t * top_k,
            BLOCK_M=block_m, BLOCK_I=lc.block_i, num_warps=lc.num_warps, PDL=pdl,
            launch_pdl=pdl,
        )
    return plan


def route_plan_ref(logits: torch.Tensor, top_k: int, block_m: int) -> RoutingPlan:
    """The same plan in plain torch (host loops over experts: the test oracle)."""
    t, e = logits.shape
    values, experts = torch.topk(logits, top_k, dim=-1, sorted=True)
    weights = torch.softmax(values.float(), dim=-1)
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # rows in expert order, stable by pair
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=logits.device)
    counts = torch.bincount(flat, minlength=e)
    n_tiles = max_tiles(t, top_k, e, block_m)
    tile_e = torch.full((n_tiles,), -1, dtype=torch.int32)
    tile_s = torch.zeros(n_tiles, dtype=torch.int32)
    tile_n = torch.zeros(n_tiles, dtype=torch.int32)
    i, first = 0, 0
    for ex, c in enumerate(counts.tolist()):
        for s in range(first, first + c, block_m):
            tile_e[i], tile_s[i], tile_n[i] = ex, s, min(s + block_m, first + c)
            i += 1
        first += c
    i32 = torch.int32
    return RoutingPlan(
        weights=weights, experts=experts.to(i32), counts=counts.to(i32), pos=pos.to(i32),
        sorted_pair=order.to(i32), tile_expert=tile_e, tile_start=tile_s, tile_end=tile_n,
        num_tiles=torch.tensor([i], dtype=i32), block_m=block_m,
    )


__all__ = ["RouteLaunch", "RoutingPlan", "max_tiles", "new_plan", "plan_outputs", "route",
           "route_plan_ref", "route_ref"]
