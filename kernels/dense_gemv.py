"""Dense projection at decode batch sizes: y = x·Wᵀ + b for M ≤ 8 rows, one weight pass.

    y[m, n] = round_x( Σ_k x[m, k]·W[n, k]  (fp32)  + b[n] (fp32) )      m < M ≤ 8, n < N

(round_x: rounded once to x's dtype, as cuBLAS's bias epilogue does, so bf16 results match
F.linear to bf16 rounding.)

At M ≤ 8 the projection is a pure weight stream (qkv of gpt-oss: 5120×2880 bf16 = 29.5 MB per
call), so the kernel is shaped for bytes in flight, not FLOPs. One program owns BLOCK_N whole
weight rows and walks K in BLOCK_K steps, holding all M rows of x: W is read exactly once and no
split-K second pass is needed. Two inner products, picked per tile config:

- FMA (default): the [BLOCK_N, BLOCK_K] tile is read as [BLOCK_N, BLOCK_K/VEC, VEC] with VEC
  elements = 16 bytes per thread (one vector load), multiplied by x and summed over VEC only, in
  the thread; the [M, BLOCK_N, BLOCK_K/VEC] fp32 partials are reduced across threads once, after
  the loop (a per-step cross-thread reduction would cost more issue slots than the FMAs at M = 8).
- DOT: yᵀ = W·xᵀ on the tensor cores with x padded to 16 columns (mma's smallest N); the W
  tiles then go through Triton's software pipeline (num_stages buffers in shared memory), which
  keeps more bytes in flight per SM than registers can.

Rows past N and x rows past M are clamped to the last valid one (loads stay unmasked and in
bounds, the store drops them). The grid depends on N only and the launcher never syncs: capturable
in a CUDA graph. M is not specialized (no recompile per batch size); the padded row count M_P
(1, 2, 4, 8) is a compile-time constant, so four variants per shape and tile config. The row
strides are specialized on purpose: knowing x's is a multiple of 8 elements is what lets x load in
16-byte vectors (unspecialized, ptxas showed 255 registers and spills at M = 8).

With a NormPrologue (kernels/norm_prologue.py; kernels/dense_gemv_norm.norm_linear_small) the
kernel takes the un-normed delta and the residual stream instead of x: every program first computes
the rows' inverse rms, then normalizes its x tiles as it loads them (program 0 writes the new
residual). NORM is a compile-time flag: without it the kernel compiles to the code it had before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.jit import KernelSet
from kernels.norm_prologue import (
    NormPrologue,
    _load_normed,
    _norm_inv_rms,
    _norm_tile,
    normed_ref,
    row_block,
)
from kernels.pdl import prefetch_rows, wait_then_release

jit = KernelSet(globals())
for _helper in (_norm_inv_rms, _norm_tile, _load_normed):  # the norm prologue's pieces
    jit(_helper)
pdl.register(jit)

MAX_ROWS = 8
DOT_MIN = 16  # tl.dot's smallest M, N and K on the GPU
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def linear_small_ref(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [N, K]
    b: torch.Tensor | None,  # [N]
) -> torch.Tensor:
    """The oracle: [M, N] in x's dtype."""
    return F.linear(x, w, b)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class GemvDenseTiles:
    block_n: int  # weight rows per program
    block_k: int  # K elements per loop step
    num_warps: int
    num_stages: int  # dot: Triton's pipeline depth; FMA: 1, or 2 = prefetch the next step
    dot: bool = False  # tensor-core inner product (x padded to 16 columns) instead of FMAs

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"GemvDenseTiles.{name} must be a power of two: {self}")
        if not 1 <= self.num_warps <= 16:
            raise ValueError(f"GemvDenseTiles.num_warps must be in 1…16: {self}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemvDenseTiles.num_stages must be in 1…8: {self}")
        if self.block_k < 32:  # at least two 16-byte vectors of fp32 along K
            raise ValueError(f"GemvDenseTiles.block_k must be ≥ 32: {self}")
        if not self.dot and self.num_stages > 2:  # FMA: 2 = register double buffer
            raise ValueError(f"GemvDenseTiles.num_stages must be 1 or 2 without dot: {self}")
        if self.dot and self.block_n < DOT_MIN:
            raise ValueError(f"GemvDenseTiles.block_n must be ≥ {DOT_MIN} with dot: {self}")
        if self.block_n * self.block_k > 32768:  # registers (FMA) or a shared-memory stage (dot)
            raise ValueError(f"GemvDenseTiles: block_n·block_k over 32768: {self}")

    def programs(self, n: int) -> int:
        return triton.cdiv(n, self.block_n)


# For bf16 (VEC = 8: 16-byte loads) every FMA tile has block_k = 8·32·num_warps: threads and then
# warps span K, so W and x share one layout (no shuffles through shared memory in the loop) and
# each thread repeats over block_n rows, one 16-byte load in flight per row. Programs are listed
# for qkv (N 5120) / out (N 2880) against 132 SMs; registers from ptxas for sm_90a at M = 1 / 8
# (python -m bench.kernels_compile --only dense_gemv).
CANDIDATES: dict[str, GemvDenseTiles] = {
    # 8 KB per step; 1280 / 720 programs. 48 / 139 regs: at M = 1 ~10 programs fit an SM, so
    # the whole grid is resident at once (~80 KB in flight per SM); at M = 8 only 3 (24 KB).
    "fma_n4_k1024_w4": GemvDenseTiles(4, 1024, 4, 1),
    # the same with the next step's tiles loaded before this step's FMAs (register double
    # buffer): 2 × 8 KB in flight per program, for M = 8 where fewer programs fit (68 / 166 regs).
    "fma_n4_k1024_w4_pf": GemvDenseTiles(4, 1024, 4, 2),
    # 2 rows × 256 threads, 8 KB per step; 2560 / 1440 small programs: finest tail, fewest regs.
    "fma_n2_k2048_w8": GemvDenseTiles(2, 2048, 8, 1),
    # 8 rows × 64 threads: 8 independent loads per thread, 640 / 360 programs (80 / 205 regs).
    "fma_n8_k512_w2": GemvDenseTiles(8, 512, 2, 1),
    # tensor cores (mma m16n8k16, x padded to 16 columns): W and x tiles stream through
    # Triton's cp.async pipeline, 3 stages of 8 KB W ahead; 48 regs whatever M; 320 / 180 programs
    # (out: 1.4 per SM, wave imbalance) with 48 KB shared memory each (4 per SM).
    "dot_n16_k256_w4_s4": GemvDenseTiles(16, 256, 4, 4, dot=True),
    # tensor cores, 2 stages of 16 KB W ahead: more per program, 64 KB shared (3 per SM).
    "dot_n16_k512_w4_s3": GemvDenseTiles(16, 512, 4, 3, dot=True),
}
DEFAULT = CANDIDATES["fma_n4_k1024_w4"]


def choose_tiles(m: int, n: int, k: int) -> GemvDenseTiles:
    """The tile config for an [m, k] × [n, k]ᵀ projection: DEFAULT while its whole grid fits the
    SMs at once (small M, few registers), the register double buffer once M's accumulators crowd
    programs out. H100, run 45 (bench.dense_gemv, notes/gpu-runs.md): at M ≤ 2 DEFAULT is within
    0.4 µs of the best candidate on qkv and out; at M = 8 cuBLAS wins, which is why the runtime
    takes this kernel only up to TritonOps.DENSE_GEMV_ROWS = 2 rows."""
    del n, k  # gpt-oss's projections are all of one kind: 2880 / 4096 wide, 2880–5120 rows
    return DEFAULT if m <= 2 else CANDIDATES["fma_n4_k1024_w4_pf"]


@jit
def _load_tiles(w_ptr, x_ptr, k0, k, K, EVEN_K: tl.constexpr):
    """W[rows, k0 + k] and x[:, k0 + k], zero past K ([BLOCK_N, BLOCK_K], [M_P, BLOCK_K])."""
    if EVEN_K:
        return tl.load(w_ptr + k0), tl.load(x_ptr + k0)
    k_ok = (k0 + k < K)[None, :]
    return tl.load(w_ptr + k0, mask=k_ok, other=0.0), tl.load(x_ptr + k0, mask=k_ok, other=0.0)


@jit
def _fma_step(part, w, xv, M_P: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
              VEC: tl.constexpr):
    """part[m, n, c] += Σ_v x[m, c·VEC + v]·w[n, c·VEC + v]: the reshapes keep each thread's
    16-byte vector in the thread, so the sum over v needs no other thread."""
    w4 = tl.reshape(w.to(tl.float32), [1, BLOCK_N, KC, VEC])
    x4 = tl.reshape(xv.to(tl.float32), [M_P, 1, KC, VEC])
    return part + tl.sum(x4 * w4, axis=3)


@jit(do_not_specialize=("M",))
def _dense_gemv_kernel(
    X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    R, SC, S_OUT, stride_rm, stride_sm, eps,  # the norm prologue's (NORM; else placeholders)
    M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr,
    PRECISION: tl.constexpr, NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False,
    BLOCK_ROW: tl.constexpr = 1, PDL: tl.constexpr = False, SECTORS: tl.constexpr = 0,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    w_rows = tl.minimum(rows, N - 1).to(tl.int64) * stride_wn  # clamped: unmasked row loads
    # PDL (kernels/pdl.py): this program's weight rows into L2 while the previous kernel runs
    prefetch_rows(W + w_rows, K, SECTORS, PDL)
    wait_then_release(PDL)
    m = tl.arange(0, M_P)  # [M_P]
    x_rows = tl.minimum(m, M - 1).to(tl.int64) * stride_xm
    r_rows = tl.minimum(m, M - 1).to(tl.int64) * stride_rm
    inv = tl.zeros([M_P], dtype=tl.float32)
    if NORM:  # every row's inverse rms; program 0 also writes the new residual
        inv = _norm_inv_rms(X, R, S_OUT, stride_xm, stride_rm, stride_sm, M, K, eps,
                            tl.program_id(0) == 0, M_P, BLOCK_ROW, HAS_RES)
    if DOT:
        k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        w_ptr = W + w_rows[:, None] + k[None, :]  # [BLOCK_N, BLOCK_K]
        x_ptr = X + x_rows[None, :] + k[:, None]  # [BLOCK_K, M_P]: xᵀ
        r_ptr = R + r_rows[None, :] + k[:, None]
        acc = tl.zeros([BLOCK_N, M_P], dtype=tl.float32)  # yᵀ
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + k < K
            if EVEN_K:
                w = tl.load(w_ptr + k0)
                xt = tl.load(x_ptr + k0)
            else:
                w = tl.load(w_ptr + k0, mask=k_ok[None, :], other=0.0)
                xt = tl.load(x_ptr + k0, mask=k_ok[:, None], other=0.0)
            if NORM:
                sc = tl.load(SC + k0 + k, mask=k_ok, other=0.0)[:, None]
                rt = xt
                if HAS_RES:
                    rt = tl.load(r_ptr + k0, mask=k_ok[:, None], other=0.0)
                xt = _norm_tile(xt, rt, sc, inv[None, :], HAS_RES)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        yt = acc
    else:
        k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        w_ptr = W + w_rows[:, None] + k[None, :]  # [BLOCK_N, BLOCK_K]
        x_ptr = X + x_rows[:, None] + k[None, :]  # [M_P, BLOCK_K]
        r_ptr = R + r_rows[:, None] + k[None, :]
        sc_ptr = SC + k[None, :]  # [1, BLOCK_K]
        part = tl.zeros([M_P, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)  # summed over VEC
        if PREFETCH:  # the next step's tiles load while this one's FMAs run
            if NORM:
                w, xv = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv[:, None], 0, k, K, EVEN_K,
                                     HAS_RES)
            else:
                w, xv = _load_tiles(w_ptr, x_ptr, 0, k, K, EVEN_K)
            for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
                if NORM:
                    w_next, x_next = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv[:, None], k0,
                                                  k, K, False, HAS_RES)
                else:
                    w_next, x_next = _load_tiles(w_ptr, x_ptr, k0, k, K, False)
                part = _fma_step(part, w, xv, M_P, BLOCK_N, BLOCK_K // VEC, VEC)
                w, xv = w_next, x_next
        else:
            for k0 in range(0, K, BLOCK_K):
                if NORM:
                    w, xv = _load_normed(w_ptr, x_ptr, r_ptr, sc_ptr, inv[:, None], k0, k, K,
                                         EVEN_K, HAS_RES)
                else:
                    w, xv = _load_tiles(w_ptr, x_ptr, k0, k, K, EVEN_K)
                part = _fma_step(part, w, xv, M_P, BLOCK_N, BLOCK_K // VEC, VEC)
        yt = tl.trans(tl.sum(part, axis=2))  # [BLOCK_N, M_P]
    if HAS_BIAS:
        yt += tl.load(B + tl.minimum(rows, N - 1)).to(tl.float32)[:, None]
    y_ptr = Y + m[None, :].to(tl.int64) * stride_ym + rows[:, None]  # [BLOCK_N, M_P]
    tl.store(y_ptr, yt.to(Y.dtype.element_ty), mask=(rows[:, None] < N) & (m[None, :] < M))


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(
            f"linear_small: x must be [M, K] and w [N, K], got {tuple(x.shape)}, {tuple(w.shape)}"
        )
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"linear_small: at most {MAX_ROWS} rows of x, got {x.shape[0]}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"linear_small: K differs: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in DTYPES:
        raise ValueError(
            f"linear_small: x and w must share one of {DTYPES}, got {x.dtype} and {w.dtype}"
        )
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(
            f"linear_small: rows must be contiguous (stride(1) == 1), got x strides "
            f"{x.stride()}, w strides {w.stride()}"
        )
    if b is not None:
        if b.shape != (w.shape[0],) or b.stride(0) != 1:
            raise ValueError(
                f"linear_small: bias must be contiguous [{w.shape[0]}], got {tuple(b.shape)} "
                f"strides {b.stride()}"
            )
        if not b.is_floating_point():
            raise ValueError(f"linear_small: bias must be floating point, got {b.dtype}")
    for name, tensor in (("w", w), ("b", b)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"linear_small: {name} on {tensor.device}, x on {x.device}")


def linear_small(
    x: torch.Tensor,  # [M, K], M ≤ MAX_ROWS, unit column stride (row stride free)
    w: torch.Tensor,  # [N, K], unit column stride
    b: torch.Tensor | None = None,  # [N], any float dtype (added in fp32)
    tiles: GemvDenseTiles | None = None,
    norm: NormPrologue | None = None,  # x is then the un-normed delta (kernels/norm_prologue)
) -> torch.Tensor:
    """Triton linear_small_ref for decode batch sizes: [M, N] in x's dtype, one launch. With
    norm, the projection of rmsnorm(x + norm.residual) instead, its new residual stream written
    into norm.resid_out (kernels/dense_gemv_norm.norm_linear_small)."""
    _check(x, w, b)
    if norm is not None:
        norm.check(x, "linear_small")
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if (m == 0 or n == 0 or k == 0) and norm is not None and norm.resid_out is not None:
        norm.resid_out.copy_(normed_ref(x, norm)[1])  # degenerate shapes: still the add
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(b.expand(m, n) if b is not None else torch.zeros_like(y))
    t = tiles if tiles is not None else choose_tiles(m, n, k)
    m_p = max(DOT_MIN, triton.next_power_of_2(m)) if t.dot else triton.next_power_of_2(m)
    normed = {}
    if norm is not None:
        normed = dict(NORM=True, HAS_RES=norm.residual is not None, BLOCK_ROW=row_block(k))
    jit["_dense_gemv_kernel"][(t.programs(n),)](
        x, w, b if b is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        *(norm.launch_args(x) if norm is not None else (x, x, x, x.stride(0), x.stride(0), 0.0)),
        M_P=m_p, BLOCK_N=t.block_n, BLOCK_K=t.block_k, VEC=16 // x.element_size(),
        HAS_BIAS=b is not None, EVEN_K=k % t.block_k == 0, DOT=t.dot,
        PREFETCH=not t.dot and t.num_stages > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=t.num_warps, num_stages=t.num_stages, **normed,
        **pdl.launch_args(x.device, row_bytes=k * w.element_size()),
    )
    return y
