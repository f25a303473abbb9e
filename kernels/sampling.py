"""Token sampling: penalties, temperature, top-k, top-p, min-p, seeded Gumbel-max, logprobs.

For one row with logits ℓ (after penalties), temperature T > 0:
    z = ℓ / T;   p = softmax(z)
    top-k:  keep z ≥ (k-th largest z)                     (k = 0: off)
    top-p:  renormalize over kept; keep p ≥ τ, τ the largest value with Σ_{p ≥ τ} p ≥ top_p
    min-p:  keep p ≥ min_p · max p
    token = argmax over kept of (z + G),  G = −log(−log U)  (Gumbel-max ≡ sampling from p)
T = 0 (or k = 1) is greedy: argmax ℓ. U is counter-based: U = hash(seed, position, token id), so a
seeded request gets the same tokens whatever else shares its batch, and no RNG state is kept.
The hash is murmur3's 32-bit finalizer (fmix32) in wrapping uint32 arithmetic, identical in torch and
Triton. Logprobs are log-softmax of the raw model logits (before penalties and temperature).

Triton path (`sample`, same signature as `sample_ref`, no host sync, CUDA-graph capturable; the
kernels are in kernels/sampling_kernels.py and kernels/radix_select.py): each row is cut into
chunks of 2048 tokens, one program per (row, chunk); the last program of a row to finish a pass
(a per-row counter) combines the row's partials, so the next pass reads two numbers.
  1. stats: max/argmax and logsumexp of the raw logits; greedy and temperature-only rows are
     finished here (Gumbel-max argmax), and top-k's first digit histogram is built;
  2. top-k: the k-th largest z by exact radix select on order-preserving uint32 keys
     (4/12/12/4-bit digit passes that touch only tokens still in the running);
  3. top-p: the threshold τ by the same radix select on the kept mass w = exp(z − max z): the
     largest value with Σ_{kept, w ≥ τ} w ≥ top_p · Σ_kept w, the reference's τ (ties kept);
  4. draw: keep = z ≥ k-th ∧ w ≥ τ ∧ w ≥ min_p; argmax of z + G per chunk, merged with ties going
     to the lowest token id (like torch.argmax); then the chosen logprob; top-N by torch.topk.
Rows that do not use a filter skip its passes (the launches stay: the grid depends on shapes
only). Differences from the reference only at exact boundaries: top_p = 1 keeps every token (the
reference's fp32 cumsum may drop a tail of underflowing tokens), and a mass tie at the top-p
boundary may resolve differently through summation order.
Gumbel-max trick: https://arxiv.org/abs/1411.0030 (Maddison et al., A* sampling)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

import kernels.sampling_kernels as K

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h · c) mod 2³² for int64 tensors holding uint32 values, without int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h & MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds (two's complement of the uint64 seed) and positions → [B] uint32 keys."""
    s = seeds.long()
    key = fmix32((s & MASK32) ^ GOLDEN)
    key = fmix32(key ^ ((s >> 32) & MASK32))
    return fmix32(key ^ (positions.long() & MASK32))


def uniform_ref(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] fp32 in (0, 1): U(seed, position, token)."""
    key = row_keys(seeds, positions)  # [B]
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    r = fmix32(fmix32(key[:, None] ^ tok[None, :]))
    return ((r >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def seed_to_int64(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def apply_penalties_ref(
    logits: torch.Tensor,  # [B, V] fp32, modified copy returned
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
    repetition: Sequence[float],
) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt+output (÷ if positive, × if negative);
    presence and frequency over the output only: ℓ −= presence·[count>0] + frequency·count."""
    out = logits.clone()
    vocab = out.shape[1]
    for b in range(out.shape[0]):
        outs = torch.tensor(list(output_ids[b]), dtype=torch.long, device=out.device)
        counts = torch.bincount(outs, minlength=vocab)[:vocab].to(out.dtype)
        if repetition[b] != 1.0:
            seen = counts > 0
            prompt = torch.tensor(list(prompt_ids[b]), dtype=torch.long, device=out.device)
            seen[prompt] = True
            row = out[b]
            row[seen] = torch.where(
                row[seen] > 0, row[seen] / repetition[b], row[seen] * repetition[b]
            )
        out[b] -= presence[b] * (counts > 0).to(out.dtype) + frequency[b] * counts
    return out


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, logprob of the chosen token under the raw logits
    top_ids: torch.Tensor  # [B, N] int64
    top_logprobs: torch.Tensor  # [B, N] fp32


def filter_mask_ref(
    z: torch.Tensor,  # [B, V] fp32 tempered logits
    top_k: torch.Tensor,  # [B] int (0 = off)
    top_p: torch.Tensor,  # [B] fp32
    min_p: torch.Tensor,  # [B] fp32
) -> torch.Tensor:
    """[B, V] bool: tokens still allowed after top-k, top-p and min-p."""
    vocab = z.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    kth = sorted_z.gather(1, (k - 1)[:, None])  # [B, 1]
    keep = z >= kth
    zk = z.masked_fill(~keep, float("-inf"))
    p = torch.softmax(zk, dim=-1)
    sorted_p, _ = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly ahead in the order
    in_nucleus = before < top_p[:, None]
    # τ: the smallest probability inside the nucleus; ties with τ are kept too.
    tau = sorted_p.masked_fill(~in_nucleus, float("inf")).amin(dim=-1, keepdim=True)
    keep &= p >= tau
    keep &= p >= min_p[:, None] * p.amax(dim=-1, keepdim=True)
    return keep


def sample_ref(
    logits: torch.Tensor,  # [B, V] fp32 (after penalties)
    temperature: torch.Tensor,  # [B] fp32, 0 = greedy
    top_k: torch.Tensor,  # [B] int
    top_p: torch.Tensor,  # [B] fp32
    min_p: torch.Tensor,  # [B] fp32
    seeds: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B] int64: position of the token being sampled
    num_top_logprobs: int = 0,
    raw_logits: torch.Tensor | None = None,  # [B, V] for logprobs; defaults to `logits`
) -> SampleOutput:
    logits = logits.float()
    greedy = (temperature <= 0) | (top_k == 1)
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    z = logits / t[:, None]
    keep = filter_mask_ref(z, top_k, top_p, min_p)
    u = uniform_ref(seeds, positions, logits.shape[1])
    gumbel = -torch.log(-torch.log(u))
    noisy = (z + gumbel).masked_fill(~keep, float("-inf"))
    tokens = torch.where(greedy, logits.argmax(dim=-1), noisy.argmax(dim=-1))
    lp = torch.log_softmax((logits if raw_logits is None else raw_logits).float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    n = min(num_top_logprobs, lp.shape[1])
    top_lp, top_ids = torch.topk(lp, n, dim=-1) if n else (lp[:, :0], tokens[:, None][:, :0])
    return SampleOutput(tokens, chosen, top_ids, top_lp)


# ---- Triton (kernels in kernels/sampling_kernels.py) ---------------------------------------------
BLOCK_V = 2048  # tokens per program: 99 programs per row at V = 201088
SUB = 512  # tokens per step inside a program (sub-blocks with no candidate skip their work)


def _check_rows(name: str, x: torch.Tensor, rows: int, device: torch.device, floating: bool) -> None:
    if x.shape != (rows,) or x.device != device or x.dtype.is_floating_point != floating:
        kind = "float" if floating else "integer"
        raise ValueError(
            f"sample: {name} must be a {kind} [{rows}] tensor on {device}, "
            f"got {x.dtype} {tuple(x.shape)} on {x.device}"
        )


def sample(
    logits: torch.Tensor,  # [B, V] fp32 (after penalties)
    temperature: torch.Tensor,  # [B] fp32, 0 = greedy
    top_k: torch.Tensor,  # [B] int
    top_p: torch.Tensor,  # [B] fp32
    min_p: torch.Tensor,  # [B] fp32
    seeds: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B] int64: position of the token being sampled
    num_top_logprobs: int = 0,
    raw_logits: torch.Tensor | None = None,  # [B, V] for logprobs; defaults to `logits`
) -> SampleOutput:
    """Triton sample_ref (same signature and outputs; see the module docstring)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"sample: logits must be fp32 [B, V] with contiguous rows, got {logits.dtype} "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    bsz, vocab = logits.shape
    raw = logits if raw_logits is None else raw_logits
    if raw.shape != logits.shape or raw.dtype != torch.float32 or raw.stride(1) != 1:
        raise ValueError("sample: raw_logits must be fp32 like logits, with contiguous rows")
    dev = logits.device
    if raw.device != dev:
        raise ValueError("sample: raw_logits on another device")
    for name, x, fl in (("temperature", temperature, True), ("top_k", top_k, False),
                        ("top_p", top_p, True), ("min_p", min_p, True),
                        ("seeds", seeds, False), ("positions", positions, False)):
        _check_rows(name, x, bsz, dev, fl)
    if vocab >= 2**31 - 1:
        raise ValueError(f"sample: vocab {vocab} too large")
    n_top = min(max(0, num_top_logprobs), vocab)
    tokens = torch.empty(bsz, dtype=torch.long, device=dev)
    chosen = torch.empty(bsz, dtype=torch.float32, device=dev)
    if bsz == 0:
        empty = torch.empty((0, n_top), device=dev)
        return SampleOutput(tokens, chosen, empty.long(), empty)
    temperature, top_p, min_p = (x.float().contiguous() for x in (temperature, top_p, min_p))
    top_k, seeds, positions = (x.contiguous() for x in (top_k, seeds, positions))
    block = BLOCK_V
    nc = triton.cdiv(vocab, block)
    nc_p = triton.next_power_of_2(nc)
    f32 = {"dtype": torch.float32, "device": dev}
    i32 = {"dtype": torch.int32, "device": dev}
    pm, prm, prs, pv = (torch.empty((bsz, nc), **f32) for _ in range(4))
    pa, pi = (torch.empty((bsz, nc), **i32) for _ in range(2))
    rsf = torch.empty((bsz, 4), **f32)  # max z, logsumexp, top-p target, top-p mass above
    rsi = torch.empty((bsz, 4), **i32)  # top-k prefix, count above, top-p prefix
    # one memset: top-k counts, top-p masses (0 bits = 0.0), per-row completion counters
    work = torch.zeros(bsz * (2 * K.HIST + K.NSLOT), **i32)
    hk = work[: bsz * K.HIST]
    hp = work[bsz * K.HIST : 2 * bsz * K.HIST].view(torch.float32)
    cnt = work[2 * bsz * K.HIST :]
    rows = (temperature, top_k, top_p, min_p)
    grid = (bsz, nc)
    sl, sr = logits.stride(0), raw.stride(0)
    K.jit["_stats_kernel"][grid](
        logits, raw, pm, pa, prm, prs, pv, pi, hk, cnt, rsf, rsi, *rows, seeds, positions,
        tokens, chosen, sl, sr, vocab, nc, BLOCK=block, NC_P=nc_p, num_warps=8,
    )
    sub = min(SUB, block)
    for p, (shift, bits, off) in enumerate(K.PASSES[1:]):
        K.jit["_topk_pass_kernel"][grid](
            logits, hk, cnt, rsi, *rows, sl, vocab, nc, SHIFT=shift, BITS=bits, OFF=off,
            SLOT=K.SLOT_TOPK + p, BLOCK=block, SUBB=sub, num_warps=8,
        )
    for p, (shift, bits, off) in enumerate(K.PASSES):
        K.jit["_topp_pass_kernel"][grid](
            logits, hp, cnt, rsf, rsi, *rows, sl, vocab, nc, SHIFT=shift, BITS=bits, OFF=off,
            SLOT=K.SLOT_TOPP + p, BLOCK=block, SUBB=min(sub, 256) if p == 0 else sub,
            num_warps=8,
        )
    K.jit["_draw_kernel"][grid](
        logits, raw, pv, pi, cnt, rsf, rsi, *rows, seeds, positions, tokens, chosen, sl, sr,
        vocab, nc, BLOCK=block, SUBB=sub, NC_P=nc_p, num_warps=8,
    )
    lse = rsf[:, 1]
    if n_top:
        top_raw, top_ids = torch.topk(raw, n_top, dim=-1)
        top_lp = top_raw - lse[:, None]
    else:
        top_ids = torch.empty((bsz, 0), dtype=torch.long, device=dev)
        top_lp = torch.empty((bsz, 0), **f32)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
