"""Activations stored in the fast path's MMA order (GemmTiles.act_ready; notes/moe.md "Prefill
GEMMs at 4096 tokens (helper-10)").

The fast path (kernels/moe_dequant._w_tile_fast) hands the MMA its dequantized weights with each
32-group of K in the column order c = 16h + 8a₁ + 2t + a₀ (k = 8t + 2a + h, a = 2a₁ + a₀), so the
activation tile gets the same permutation — and GEMM 1 also converts bf16 x to fp16 — inside
every k-step (_a_tile_fast). In the compiled loop that is shared memory → registers → shared
memory (LDS, PRMT/IMAD/F2FP, STSM, a barrier) per step, and it makes the MMA's shared operand a
fresh buffer each step, so Triton cannot leave the wgmma in flight across steps (its pipeliner
wants that operand straight from the multi-buffered cp.async ring) and waits for it at once.

With act_ready the activations are stored in that order up front instead, as fp16:
- GEMM 1's x by one small pass before it (_x_ready_kernel: T·H·2 bytes read and written),
- GEMM 1's output (GEMM 2's activations) by its own stores, at the permuted columns,
so both GEMMs load their activation tile with no conversion and feed it to the MMA as loaded.
Same products, same order of sums: the same bits as the plain fast path (K a multiple of 32, so
every 32-group is whole and the permutation stays inside the tensor).
"""

from __future__ import annotations

import triton.language as tl


def _mma_cols(x):
    """[R, 32·G] tile → its columns in the fast path's MMA order within each 32-group (the
    permutation _a_tile_fast applies; element-for-element the same reshape)."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    x = tl.reshape(x, (R, C // 32, 4, 2, 2, 2))  # k = 8t + 4a₁ + 2a₀ + h: [R, G, t, a₁, a₀, h]
    return tl.reshape(tl.permute(x, (0, 1, 5, 3, 2, 4)), (R, C))  # [R, G, h, a₁, t, a₀]


def _mma_col_of(k):
    """Where column k (int32, any shape) is stored in MMA order: 32⌊k/32⌋ + 16h + 8a₁ + 2t + a₀
    for k mod 32 = 8t + 4a₁ + 2a₀ + h."""
    r = k & 31
    return (k - r) + 16 * (r & 1) + 8 * ((r >> 2) & 1) + 2 * (r >> 3) + ((r >> 1) & 1)


def _a_tile_ready(A, a_row, k0, K, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """_a_tile_fast of activations already in MMA order (fp16): the tile as loaded."""
    k = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:  # whole 32-groups: position < K exactly where the column it holds is
        return tl.load(A + a_row[:, None] + k[None, :], mask=(k < K)[None, :], other=0.0)
    return tl.load(A + a_row[:, None] + k[None, :])


def _x_ready_kernel(X, stride_x, XR, stride_r, T, H, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """XR[t, :] = fp16(X[t, :]) with each 32-group in MMA order (H a multiple of 32)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (t < T)[:, None] & (h < H)[None, :]  # whole 32-groups: the mask is permutation-free
    x = tl.load(X + t.to(tl.int64)[:, None] * stride_x + h[None, :], mask=m, other=0.0)
    xr = _mma_cols(x.to(tl.float16))
    tl.store(XR + t.to(tl.int64)[:, None] * stride_r + h[None, :], xr, mask=m)


HELPERS = (_mma_cols, _mma_col_of, _a_tile_ready)
KERNELS = (_x_ready_kernel,)
