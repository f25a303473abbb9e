"""Triton kernels of `kernels.sampling.sample` (v2): few launches, rows split over many programs.

Grid (B, NC) everywhere, NC chunks of BLOCK tokens per row (2048 on the GPU: 99 programs for one
row of 201088 logits). Per-row completion counters (CNT) let the last program of a row in each
launch reduce that row's partials and write its small state, so the next launch reads two scalars
instead of replaying histograms, and no separate merge launch is needed:

  stats  every row: chunk max/first argmax of ℓ, max/Σexp of the raw logits; plain sampling rows
         (no top-k/top-p/min-p) also draw their chunk's Gumbel-max here; top-k rows build the
         4-bit histogram of their first digit. Last program: greedy and plain rows are finished
         (token, logprob); max z, logsumexp and the first top-k digit are stored.
  top-k  passes 1-3 (12, 12, 4 bits): count histograms of the keys under the prefix (scatter
         atomics, sub-blocks with no key under the prefix skip them).
  top-p  passes 0-3 (4, 12, 12, 4 bits) of the kept mass w = exp(z − max z) over key ≥ kth: pass 0
         sums 16 bins per program (compare-and-sum), later passes scatter-add masses of the few
         keys under the prefix.
  draw   rows with a filter: keep = key ≥ max(kth, τ) ∧ w ≥ min_p; Gumbel-max over kept tokens
         (sub-blocks with nothing kept skip the hashing); the last program merges and finishes.
Rows that do not use a pass return at once (the launches stay: the grid depends on shapes only).
"""

from __future__ import annotations

import triton.language as tl

from kernels.jit import KernelSet
from kernels.radix_select import HELPERS, digit, order_key, select_bin, under_prefix

jit = KernelSet(globals())
for _helper in HELPERS:
    jit(_helper)

# radix passes over the 32-bit keys: (shift, bits, offset of the pass's bins in a row's histograms)
PASSES = ((28, 4, 0), (16, 12, 16), (4, 12, 16 + 4096), (0, 4, 16 + 2 * 4096))
HIST = 16 + 2 * 4096 + 16  # histogram bins per row (all passes)
SLOT_STATS, SLOT_TOPK, SLOT_TOPP, SLOT_DRAW, NSLOT = 0, 1, 4, 8, 9  # counters per row
BIG = 2147483647
# the kernels' copies (Triton reads only constexpr globals)
_HIST, _NSLOT, _BIG = tl.constexpr(HIST), tl.constexpr(NSLOT), tl.constexpr(BIG)
_SLOT_STATS, _SLOT_DRAW = tl.constexpr(SLOT_STATS), tl.constexpr(SLOT_DRAW)


@jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@jit
def _row_key(SEED, POSN, b):
    s = tl.load(SEED + b).to(tl.int64)
    p = tl.load(POSN + b).to(tl.int64)
    key = _fmix32((s & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    key = _fmix32(key ^ ((s >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return _fmix32(key ^ (p & 0xFFFFFFFF).to(tl.uint32))


@jit
def _gumbel(key, tok):
    r = _fmix32(_fmix32(key ^ tok.to(tl.uint32)))
    u = ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@jit
def _row(b, TEMP, TOPK, TOPP, MINP, V):
    """(temperature used, greedy, k, top-k on, top_p, top-p on, min_p, plain) of row b."""
    temp = tl.load(TEMP + b)
    k = tl.minimum(tl.maximum(tl.load(TOPK + b).to(tl.int64), 0), V).to(tl.int32)
    greedy = (temp <= 0) | (k == 1)
    t = tl.where(greedy, 1.0, temp)
    tp = tl.load(TOPP + b)
    mp = tl.load(MINP + b)
    topk_on = (~greedy) & (k > 0) & (k < V)
    topp_on = (~greedy) & (tp < 1.0)
    plain = (~greedy) & (~topk_on) & (~topp_on) & (mp <= 0.0)
    return t, greedy, k, topk_on, tp, topp_on, mp, plain


@jit
def _first_best(v, idx):
    """(max of v, smallest idx where v is maximal) — torch.argmax's tie rule."""
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best, idx, _BIG), axis=0)


@jit
def _finish(R, TOK, LP, b, sr_b, tok, lse, V):
    tok = tl.minimum(tok, V - 1)  # all −inf rows (cannot happen with finite logits) stay in range
    tl.store(TOK + b, tok.to(tl.int64))
    tl.store(LP + b, tl.load(R + b * sr_b + tok) - lse)


@jit
def _merge_draw(PV, PI, b, NC, NC_P: tl.constexpr):
    c = tl.arange(0, NC_P)
    pv = tl.load(PV + b * NC + c, mask=c < NC, other=float("-inf"), volatile=True)
    pi = tl.load(PI + b * NC + c, mask=c < NC, other=_BIG, volatile=True)
    _, tok = _first_best(pv, pi)
    return tok


@jit
def _stats_kernel(
    L, R, PM, PA, PRM, PRS, PV, PI, HK, CNT, RSF, RSI, TEMP, TOPK, TOPP, MINP, SEED, POSN,
    TOK, LP, sl_b, sr_b, V, NC, BLOCK: tl.constexpr, NC_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, greedy, k, topk_on, tp, topp_on, mp, plain = _row(b, TEMP, TOPK, TOPP, MINP, V)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(L + b * sl_b + offs, mask=mask, other=float("-inf"))
    mx, arg = _first_best(x, offs)
    r = tl.load(R + b * sr_b + offs, mask=mask, other=float("-inf"))
    rm = tl.max(r, axis=0)
    tl.store(PM + b * NC + c, mx)
    tl.store(PA + b * NC + c, arg)
    tl.store(PRM + b * NC + c, rm)
    tl.store(PRS + b * NC + c, tl.sum(tl.exp(r - rm), axis=0))
    if plain:  # plain sampling: the Gumbel-max over the whole chunk is final
        z = tl.div_rn(x, t)
        noisy = tl.where(mask, z + _gumbel(_row_key(SEED, POSN, b), offs), float("-inf"))
        best, idx = _first_best(noisy, offs)
        tl.store(PV + b * NC + c, best)
        tl.store(PI + b * NC + c, idx)
    if topk_on:  # top-k pass 0: counts of the top 4 key bits
        key = order_key(tl.div_rn(x, t))
        h = tl.histogram(digit(key, 28, 4), 16, mask=mask)
        tl.atomic_add(HK + b * _HIST + tl.arange(0, 16), h, mask=h > 0)
    if tl.atomic_add(CNT + b * _NSLOT + _SLOT_STATS, 1) == NC - 1:  # the row's last program
        cc = tl.arange(0, NC_P)
        cm = cc < NC
        gm = tl.load(PM + b * NC + cc, mask=cm, other=float("-inf"), volatile=True)
        ga = tl.load(PA + b * NC + cc, mask=cm, other=_BIG, volatile=True)
        gmax, gtok = _first_best(gm, ga)
        prm = tl.load(PRM + b * NC + cc, mask=cm, other=float("-inf"), volatile=True)
        prs = tl.load(PRS + b * NC + cc, mask=cm, other=0.0, volatile=True)
        top = tl.max(prm, axis=0)
        lse = top + tl.log(tl.sum(prs * tl.exp(prm - top), axis=0))
        tl.store(RSF + b * 4, tl.div_rn(gmax, t))  # max z: rounding of ℓ/t is monotone
        tl.store(RSF + b * 4 + 1, lse)
        if greedy:
            _finish(R, TOK, LP, b, sr_b, gtok, lse, V)
        if plain:
            _finish(R, TOK, LP, b, sr_b, _merge_draw(PV, PI, b, NC, NC_P), lse, V)
        if topk_on:
            h0 = tl.load(HK + b * _HIST + tl.arange(0, 16), volatile=True)
            d, above = select_bin(h0, 0, k, 16)
            tl.store(RSI + b * 4, (d.to(tl.uint32) << 28).to(tl.int32, bitcast=True))
            tl.store(RSI + b * 4 + 1, above)


@jit
def _topk_pass_kernel(
    L, HK, CNT, RSI, TEMP, TOPK, TOPP, MINP, sl_b, V, NC,
    SHIFT: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, SLOT: tl.constexpr,
    BLOCK: tl.constexpr, SUBB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, greedy, k, topk_on, tp, topp_on, mp, plain = _row(b, TEMP, TOPK, TOPP, MINP, V)
    if topk_on:
        prefix = tl.load(RSI + b * 4).to(tl.uint32, bitcast=True)
        hk = HK + b * _HIST + OFF
        for s0 in tl.static_range(0, BLOCK, SUBB):
            offs = c * BLOCK + s0 + tl.arange(0, SUBB)
            mask = offs < V
            key = order_key(tl.div_rn(tl.load(L + b * sl_b + offs, mask=mask, other=0.0), t))
            match = mask & under_prefix(key, prefix, SHIFT + BITS)
            if tl.max(match.to(tl.int32), axis=0) > 0:  # most sub-blocks hold no candidate
                ones = tl.full([SUBB], 1, tl.int32)
                tl.atomic_add(hk + digit(key, SHIFT, BITS), ones, mask=match)
        if tl.atomic_add(CNT + b * _NSLOT + SLOT, 1) == NC - 1:
            h = tl.load(hk + tl.arange(0, 1 << BITS), volatile=True)
            d, above = select_bin(h, tl.load(RSI + b * 4 + 1), k, 1 << BITS)
            prefix = prefix | (d.to(tl.uint32) << SHIFT)
            tl.store(RSI + b * 4, prefix.to(tl.int32, bitcast=True))
            tl.store(RSI + b * 4 + 1, above)


@jit
def _topp_pass_kernel(
    L, HP, CNT, RSF, RSI, TEMP, TOPK, TOPP, MINP, sl_b, V, NC,
    SHIFT: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, SLOT: tl.constexpr,
    BLOCK: tl.constexpr, SUBB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, greedy, k, topk_on, tp, topp_on, mp, plain = _row(b, TEMP, TOPK, TOPP, MINP, V)
    if topp_on:
        FIRST: tl.constexpr = SHIFT + BITS >= 32
        m = tl.load(RSF + b * 4)
        kth = tl.where(topk_on, tl.load(RSI + b * 4).to(tl.uint32, bitcast=True), 0)
        prefix = tl.load(RSI + b * 4 + 2).to(tl.uint32, bitcast=True)  # garbage on pass 0: unused
        hp = HP + b * _HIST + OFF
        bins = tl.arange(0, 16)
        acc = tl.zeros([16], tl.float32)
        for s0 in tl.static_range(0, BLOCK, SUBB):
            offs = c * BLOCK + s0 + tl.arange(0, SUBB)
            mask = offs < V
            z = tl.div_rn(tl.load(L + b * sl_b + offs, mask=mask, other=0.0), t)
            key = order_key(z)
            use = mask & (key >= kth) & under_prefix(key, prefix, SHIFT + BITS)
            dg = digit(key, SHIFT, BITS)
            if FIRST:  # every kept token: 16 bins summed here, 16 atomics per program
                w = tl.where(use, tl.exp(z - m), 0.0)
                acc += tl.sum(tl.where(dg[:, None] == bins[None, :], w[:, None], 0.0), axis=0)
            else:
                if tl.max(use.to(tl.int32), axis=0) > 0:  # few tokens under the prefix
                    tl.atomic_add(hp + dg, tl.exp(z - m), mask=use)
        if FIRST:
            tl.atomic_add(hp + bins, acc, mask=acc > 0)
        if tl.atomic_add(CNT + b * _NSLOT + SLOT, 1) == NC - 1:
            h = tl.load(hp + tl.arange(0, 1 << BITS), volatile=True)
            if FIRST:
                target = tp * tl.sum(h, axis=0)  # top_p of the kept mass
                above = 0.0
                prefix = tl.full([], 0, tl.uint32)
                tl.store(RSF + b * 4 + 2, target)
            else:
                target = tl.load(RSF + b * 4 + 2)
                above = tl.load(RSF + b * 4 + 3)
            d, above = select_bin(h, above, target, 1 << BITS)
            prefix = prefix | (d.to(tl.uint32) << SHIFT)
            tl.store(RSI + b * 4 + 2, prefix.to(tl.int32, bitcast=True))
            tl.store(RSF + b * 4 + 3, above)


@jit
def _draw_kernel(
    L, R, PV, PI, CNT, RSF, RSI, TEMP, TOPK, TOPP, MINP, SEED, POSN, TOK, LP, sl_b, sr_b, V, NC,
    BLOCK: tl.constexpr, SUBB: tl.constexpr, NC_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, greedy, k, topk_on, tp, topp_on, mp, plain = _row(b, TEMP, TOPK, TOPP, MINP, V)
    if (~greedy) & (~plain):
        m = tl.load(RSF + b * 4)
        kth = tl.where(topk_on, tl.load(RSI + b * 4).to(tl.uint32, bitcast=True), 0)
        tau = tl.where(topp_on, tl.load(RSI + b * 4 + 2).to(tl.uint32, bitcast=True), 0)
        thr = tl.maximum(kth, tau)
        rkey = _row_key(SEED, POSN, b)
        best = tl.full([], float("-inf"), tl.float32)
        bidx = tl.full([], _BIG, tl.int32)
        for s0 in tl.static_range(0, BLOCK, SUBB):
            offs = c * BLOCK + s0 + tl.arange(0, SUBB)
            mask = offs < V
            z = tl.div_rn(tl.load(L + b * sl_b + offs, mask=mask, other=0.0), t)
            keep = mask & (order_key(z) >= thr) & (tl.exp(z - m) >= mp)
            if tl.max(keep.to(tl.int32), axis=0) > 0:  # hash only where something is kept
                noisy = tl.where(keep, z + _gumbel(rkey, offs), float("-inf"))
                sb, si = _first_best(noisy, offs)
                bidx = tl.where(sb > best, si, bidx)  # earlier sub-blocks win ties
                best = tl.maximum(best, sb)
        tl.store(PV + b * NC + c, best)
        tl.store(PI + b * NC + c, bidx)
        if tl.atomic_add(CNT + b * _NSLOT + _SLOT_DRAW, 1) == NC - 1:
            lse = tl.load(RSF + b * 4 + 1)
            _finish(R, TOK, LP, b, sr_b, _merge_draw(PV, PI, b, NC, NC_P), lse, V)
