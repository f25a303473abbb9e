"""Attention of packed variable-length query chunks over each sequence's slot cache.

Sequence n owns query rows cu_seqlens[n] … cu_seqlens[n+1]−1 at positions start_pos[n] + i and reads
keys/values of positions 0 … its own position from cache row slot[n] (already written, this chunk
included). For query head h (KV head h // (nq/nkv)) at position p:
    sᵢ = q·kᵢ · scale                    for key positions i in [lo(p), p], lo = max(0, p − W + 1)
                                          with a sliding window W, else 0
    o  = Σᵢ exp(sᵢ − m) vᵢ / (exp(sink_h − m) + Σᵢ exp(sᵢ − m)),  m = max(sink_h, maxᵢ sᵢ)
The learned sink joins the softmax denominator and contributes no value (gpt-oss).
Cache index of position i is i mod C (ring buffer on sliding layers; C ≥ W + chunk length − 1).

Triton kernel (FlashAttention-2 style, online softmax in base 2): the host cuts every sequence into
tiles of BLOCK_T query tokens; one program per (tile, KV head) stacks the G = nq/nkv query heads of
its KV head under each token, an M = BLOCK_T·G row block (row r = token r // G, head r % G), so each
key/value block it loads feeds G heads' rows through one tensor-core product. It walks key positions
lo … last query position of the tile (lo = first query position − W + 1 with a window, else 0),
reading cache index position mod C, and masks causality and the window per row. Tiles are issued
longest key range first.
FlashAttention-2: https://arxiv.org/abs/2307.08691; sinks: https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.jit import KernelSet

jit = KernelSet(globals())
LOG2E = 1.4426950408889634


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


@jit
def _prefill_kernel(
    Q, KC, VC, TILES, SINK, OUT,
    sq_t, sq_h, skc_s, skc_c, skc_h, svc_s, svc_c, svc_h, so_t, so_h,
    CAP, qk_scale, WINDOW: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_T * G_P
    tile = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    row0 = tl.load(TILES + tile * 4 + 0).to(tl.int64)  # first query row of the tile
    ntok = tl.load(TILES + tile * 4 + 1)
    pos0 = tl.load(TILES + tile * 4 + 2).to(tl.int64)  # position of that row
    slot = tl.load(TILES + tile * 4 + 3).to(tl.int64)

    r = tl.arange(0, BLOCK_M)
    tok = r // G_P
    g = r % G_P
    heads = kvh * G + g
    rmask = (tok < ntok) & (g < G)
    qpos = pos0 + tok  # [BLOCK_M]
    cols = tl.arange(0, D)
    q = tl.load(Q + (row0 + tok)[:, None] * sq_t + heads[:, None] * sq_h + cols[None, :],
                mask=rmask[:, None], other=0.0)  # [BLOCK_M, D]

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ell = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = pos0 + ntok - 1
    lo = tl.maximum(pos0 - WINDOW + 1, 0) if WINDOW > 0 else pos0 * 0
    k_base = KC + slot * skc_s + kvh * skc_h
    v_base = VC + slot * svc_s + kvh * svc_h
    offs = tl.arange(0, BLOCK_N)
    for start in range(lo, hi + 1, BLOCK_N):
        kpos = start + offs  # [BLOCK_N]
        kvalid = kpos <= hi
        idx = kpos % CAP
        k = tl.load(k_base + idx[:, None] * skc_c + cols[None, :], mask=kvalid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        allowed = kpos[None, :] <= qpos[:, None]
        if WINDOW > 0:
            allowed &= kpos[None, :] > qpos[:, None] - WINDOW
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        ell = ell * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + idx[:, None] * svc_c + cols[None, :], mask=kvalid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    sink = tl.load(SINK + heads, mask=g < G, other=0.0) * 1.4426950408889634
    m_f = tl.maximum(m, sink)
    scale = tl.exp2(m - m_f)
    denom = ell * scale + tl.exp2(sink - m_f)
    out = acc * (scale / denom)[:, None]
    tl.store(OUT + (row0 + tok)[:, None] * so_t + heads[:, None] * so_h + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=rmask[:, None])


def prefill_tiles(
    cu_seqlens: list[int], seq_slots: list[int], seq_start_pos: list[int], block_t: int
) -> list[tuple[int, int, int, int]]:
    """(first query row, rows, first position, slot) per tile, the longest key range first."""
    tiles = []
    for n, (slot, start) in enumerate(zip(seq_slots, seq_start_pos, strict=True)):
        a, b = cu_seqlens[n], cu_seqlens[n + 1]
        for row in range(a, b, block_t):
            tiles.append((row, min(block_t, b - row), start + row - a, slot))
    tiles.sort(key=lambda t: -(t[1] + t[2]))
    return tiles


def max_prefill_tiles(rows: int, seqs: int, block_t: int) -> int:
    """The most tiles that `rows` query rows in at most `seqs` sequences can need: the size of a
    fixed table for a CUDA graph, whose unused entries are empty tiles (0 rows: the program
    reads no key and stores nothing)."""
    return -(-rows // block_t) + min(rows, seqs)


def prefill_block_t(nq: int, nkv: int) -> int:
    """Query tokens per tile: 128 query rows (tokens × the KV head's group of query heads)."""
    return max(1, 128 // triton.next_power_of_2(nq // nkv))


def check_sequences(
    cu_seqlens: list[int], seq_slots: list[int], seq_start_pos: list[int], rows: int,
    cache_slots: int, cap: int, window: int,
) -> None:
    """Raises ValueError unless every sequence fits a cache of `cache_slots` slot rows (dummy
    included) and capacity `cap` on a layer with `window` (0 = full): the checks behind a tile
    table, for callers that build one table for several layer kinds (runtime/step_graphs.py)."""
    cu, slots, starts = cu_seqlens, seq_slots, seq_start_pos
    if len(cu) != len(slots) + 1 or len(starts) != len(slots) or cu[0] != 0 or cu[-1] != rows:
        raise ValueError(
            f"prefill_attention: cu_seqlens must be [N+1] from 0 to {rows} with N = "
            f"{len(slots)} slots and start positions, got {cu}"
        )
    for n in range(len(slots)):
        length = cu[n + 1] - cu[n]
        if length < 0 or starts[n] < 0 or not 0 <= slots[n] < cache_slots:
            raise ValueError(f"prefill_attention: bad sequence {n}: rows {cu[n]}…{cu[n + 1]}, "
                             f"slot {slots[n]}, start {starts[n]}")
        if window == 0 and starts[n] + length > cap:
            raise ValueError(f"prefill_attention: sequence {n} ends at position "
                             f"{starts[n] + length - 1}, beyond the cache capacity {cap}")
        wraps = starts[n] + length > cap
        if window > 0 and wraps and length + window - 1 > cap:
            raise ValueError(f"prefill_attention: a {length}-token chunk needs a ring of ≥ "
                             f"{length + window - 1} positions, the cache holds {cap}")


def prefill_table(
    cu_seqlens: list[int] | torch.Tensor, seq_slots: list[int] | torch.Tensor,
    seq_start_pos: list[int] | torch.Tensor, rows: int, cache_slots: int, cap: int, window: int,
    block_t: int, device: torch.device,
) -> torch.Tensor:
    """The tile table [tiles, 4] int32 on `device` for a packed batch of `rows` query rows,
    after checking every sequence against the cache (capacity `cap`, `window`). It depends on
    the batch and the layer kind only (cache_slots: the cache's slot rows, dummy included): a
    model computes it once per step and layer kind and passes it to every layer's
    prefill_attention (the host loops over the sequences once, not once per layer)."""
    cu = [int(x) for x in cu_seqlens]
    slots = [int(x) for x in seq_slots]
    starts = [int(x) for x in seq_start_pos]
    check_sequences(cu, slots, starts, rows, cache_slots, cap, window)
    tiles = prefill_tiles(cu, slots, starts, block_t)
    host = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 4)  # [tiles, 4]
    if device.type == "cuda":  # pinned: the copy overlaps whatever the GPU is still doing
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def prefill_attention(
    q: torch.Tensor,  # [T, nq, d] (rotated)
    k_cache: torch.Tensor,  # [S+1, C, nkv, d]
    v_cache: torch.Tensor,  # [S+1, C, nkv, d]
    cu_seqlens: list[int] | torch.Tensor,  # [N+1]
    seq_slots: list[int] | torch.Tensor,  # [N]
    seq_start_pos: list[int] | torch.Tensor,  # [N]
    sinks: torch.Tensor,  # [nq] fp32
    window: int,
    scale: float,
    *,
    block_t: int | None = None,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton prefill_attention_ref. The sequence tables are read on the host (pass lists: tensors
    cost a device sync), or given already as `table` (prefill_table: the same for every layer of
    a kind in a step); the cache must already hold every sequence's positions 0 … its last one."""
    if q.dim() != 3:
        raise ValueError(f"prefill_attention: q must be [T, nq, d], got {tuple(q.shape)}")
    t, nq, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != d:
        raise ValueError(
            f"prefill_attention: caches must both be [S+1, C, nkv, {d}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    if nq % nkv:
        raise ValueError(f"prefill_attention: {nq} query heads not a multiple of {nkv} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"prefill_attention: head_dim must be a power of two ≥ 16, got {d}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"prefill_attention: q ({q.dtype}) and caches ({k_cache.dtype}, {v_cache.dtype}) differ"
        )
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("prefill_attention: q and the caches need a contiguous last dimension")
    if sinks.shape != (nq,) or sinks.dtype != torch.float32 or sinks.device != q.device:
        raise ValueError(f"prefill_attention: sinks must be fp32 [{nq}] on {q.device}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError("prefill_attention: q and the caches must be on one device")
    if window < 0:
        raise ValueError(f"prefill_attention: window must be ≥ 0, got {window}")
    g = nq // nkv
    g_p = triton.next_power_of_2(g)
    if block_t is None:
        block_t = prefill_block_t(nq, nkv)
    if table is None:
        table = prefill_table(cu_seqlens, seq_slots, seq_start_pos, t, k_cache.shape[0], cap,
                              window, block_t, q.device)
    elif table.dim() != 2 or table.shape[1] != 4 or table.dtype != torch.int32:
        raise ValueError(f"prefill_attention: table must be int32 [tiles, 4], got "
                         f"{tuple(table.shape)} {table.dtype}")
    out = torch.empty((t, nq, d), dtype=q.dtype, device=q.device)
    if table.shape[0] == 0:
        return out
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: no TF32 rounding
    jit["_prefill_kernel"][(table.shape[0], nkv)](
        q, k_cache, v_cache, table, sinks, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        cap, scale * LOG2E, window,
        G=g, G_P=g_p, BLOCK_T=block_t, D=d, BLOCK_N=block_n, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
