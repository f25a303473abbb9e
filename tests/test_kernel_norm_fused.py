"""The rmsnorm fused into its consumers' prologues (kernels/norm_prologue.py), interpreted on the
CPU in float32/float16: the dense GEMV (kernels/dense_gemv_norm.py), the fused router and the
MoE block (kernels/moe_router.py, kernels/moe.moe_forward_norm) give the bits of the standalone
kernels.rmsnorm.rmsnorm followed by the unfused kernel, and the new residual stream exactly, with
the residual they were given untouched. GPU variants at gpt-oss shapes in bf16 run with -m gpu.
"""

from __future__ import annotations

import pytest
import torch

from kernels.dense_gemv import CANDIDATES, GemvDenseTiles, linear_small
from kernels.dense_gemv_norm import choose_norm_tiles, norm_linear_small, norm_linear_small_ref
from kernels.norm_prologue import NormPrologue, exact_scale, norm_prologue
from kernels.rmsnorm import rmsnorm, rmsnorm_ref

EPS = 1e-5


def rows(m: int, k: int, dtype: torch.dtype, seed: int, residual: bool = True):  # noqa: ANN201
    """(delta, residual or None, scale): a residual stream 10× the delta, as in a deep layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    r = (10 * torch.randn(m, k, generator=g)).to(dtype) if residual else None
    scale = 0.5 + torch.rand(k, generator=g)
    return x, r, scale


def projection(n: int, k: int, dtype: torch.dtype, seed: int):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(n, k, generator=g) / k**0.5).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("residual", [True, False])
def test_fused_projection_is_rmsnorm_then_the_projection_bit_for_bit(
    dtype: torch.dtype, m: int, residual: bool
) -> None:
    k, n = 200, 37  # K not a multiple of the K block, N not of the row block
    x, r, scale = rows(m, k, dtype, seed=m, residual=residual)
    w, b = projection(n, k, dtype, seed=m)
    r_before = None if r is None else r.clone()
    tiles = GemvDenseTiles(8, 64, 2, 1)
    y, s = norm_linear_small(x, r, scale, EPS, w, b, tiles)
    h, s_want = rmsnorm(x, scale, EPS, r)  # the standalone Triton norm
    assert torch.equal(y, linear_small(h, w, b, tiles))
    assert torch.equal(s, s_want)
    if r is None:
        assert s is x  # the first layer: the residual stream is the embedding itself
    else:
        assert torch.equal(r, r_before) and s.data_ptr() not in (r.data_ptr(), x.data_ptr())
    want_y, want_s = norm_linear_small_ref(x, r, scale, EPS, w, b)
    assert torch.equal(s, want_s)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(y, want_y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_every_tile_candidate_takes_the_prologue(name: str) -> None:
    x, r, scale = rows(3, 300, torch.float16, seed=7)
    w, b = projection(21, 300, torch.float16, seed=7)
    tiles = CANDIDATES[name]
    y, s = norm_linear_small(x, r, scale, EPS, w, b, tiles)
    h, s_want = rmsnorm(x, scale, EPS, r)
    assert torch.equal(s, s_want)
    assert torch.equal(y, linear_small(h, w, b, tiles))


@pytest.mark.parametrize("prefetch", [1, 2])
def test_register_prefetch_with_the_prologue(prefetch: int) -> None:
    for k in (64, 192, 200):  # one block, several whole blocks, ragged tail
        x, r, scale = rows(5, k, torch.float32, seed=k)
        w, b = projection(9, k, torch.float32, seed=k)
        tiles = GemvDenseTiles(4, 64, 2, prefetch)
        y, s = norm_linear_small(x, r, scale, EPS, w, b, tiles)
        h, s_want = rmsnorm(x, scale, EPS, r)
        assert torch.equal(s, s_want) and torch.equal(y, linear_small(h, w, b, tiles))


def test_strided_rows_and_the_default_tiles() -> None:
    wide = torch.randn(4, 500)
    x = wide[:, 100:356]  # row stride 500
    r = torch.randn(4, 700)[:, :256]
    scale = torch.rand(256) + 0.5
    w, b = projection(33, 256, torch.float32, seed=1)
    y, s = norm_linear_small(x, r, scale, EPS, w, b)
    h, s_want = rmsnorm(x, scale, EPS, r)
    assert torch.equal(s, s_want)
    assert torch.equal(y, linear_small(h, w, b, choose_norm_tiles(4, 33, 256)))


def test_the_prologue_normalizes_with_the_rms_of_the_sum() -> None:
    """Not merely equal to the Triton norm: the rms is that of x + residual, per row."""
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    r = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    w = torch.eye(2)
    y, s = norm_linear_small(x, r, torch.ones(2), 0.0, w, None, GemvDenseTiles(2, 32, 1, 1))
    assert torch.equal(s, x + r)
    torch.testing.assert_close(y, torch.tensor([[2**0.5, 0.0], [0.0, 2**0.5]]))


def test_a_scale_copy_in_x_dtype_gives_the_same_bits() -> None:
    x, r, scale = rows(3, 200, torch.float16, seed=5)
    w, b = projection(37, 200, torch.float16, seed=5)
    assert exact_scale(scale, torch.float16) is None  # random fp32 values: no exact copy
    scale = scale.half().float()  # values a checkpoint stores in 16 bits
    narrow = exact_scale(scale, torch.float16)
    assert narrow is not None and narrow.dtype == torch.float16
    for tiles in (GemvDenseTiles(8, 64, 2, 1), GemvDenseTiles(4, 64, 2, 2)):
        want = norm_linear_small(x, r, scale, EPS, w, b, tiles)
        got = norm_linear_small(x, r, narrow, EPS, w, b, tiles)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="scale must be fp32 or"):
        norm_linear_small(x, r, scale.bfloat16(), EPS, w, b)


@pytest.mark.parametrize(
    "case,match",
    [
        ("scale_dtype", "scale"),
        ("scale_shape", "scale"),
        ("resid_out_missing", "resid_out"),
        ("in_place", "overlap"),
        ("residual_shape", "residual"),
        ("residual_dtype", "residual"),
        ("negative_eps", "eps"),
    ],
)
def test_prologues_that_do_not_fit_are_refused(case: str, match: str) -> None:
    x, r, scale = rows(2, 64, torch.float32, seed=0)
    w, b = projection(8, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        norm = {
            "scale_dtype": lambda: NormPrologue(scale.int(), EPS, r, torch.empty_like(r)),
            "scale_shape": lambda: NormPrologue(scale[:32], EPS, r, torch.empty_like(r)),
            "resid_out_missing": lambda: NormPrologue(scale, EPS, r, None),
            "in_place": lambda: NormPrologue(scale, EPS, r, r[:, :]),
            "residual_shape": lambda: NormPrologue(scale, EPS, r[:1], torch.empty(1, 64)),
            "residual_dtype": lambda: NormPrologue(scale, EPS, r.half(), torch.empty_like(r.half())),
            "negative_eps": lambda: NormPrologue(scale, -1.0),
        }[case]()
        linear_small(x, w, b, None, norm)


def test_resid_out_must_not_be_x() -> None:
    x, r, scale = rows(2, 64, torch.float32, seed=0)
    w, b = projection(8, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="overlap x"):
        linear_small(x, w, b, None, NormPrologue(scale, EPS, r, x))


def test_norm_prologue_allocates_a_fresh_residual_only_with_a_residual() -> None:
    x, r, scale = rows(2, 64, torch.float32, seed=0)
    assert norm_prologue(x, None, scale, EPS).new_residual(x) is x
    p = norm_prologue(x, r, scale, EPS)
    assert p.resid_out is not None and p.new_residual(x) is p.resid_out
    out = p.resid_out
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.data_ptr() not in (x.data_ptr(), r.data_ptr())


@pytest.mark.parametrize("n", [0, 5])
@pytest.mark.parametrize("k", [0, 64])
def test_degenerate_shapes_still_write_the_new_residual(n: int, k: int) -> None:
    """No output columns or no K: nothing for the kernel to do, but the caller still reads the
    residual stream (the add) from resid_out."""
    x, r, scale = rows(2, k, torch.float32, seed=3)
    w, b = projection(n, k, torch.float32, seed=3)
    y, s = norm_linear_small(x, r, scale, EPS, w, b)
    assert y.shape == (2, n) and torch.equal(s, rmsnorm_ref(x, scale, EPS, r)[1])
    if k == 0:
        assert torch.equal(y, b.expand(2, n))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("residual", [True, False])
def test_gpt_oss_qkv_bf16_on_gpu_and_in_a_graph(m: int, residual: bool) -> None:
    """qkv of gpt-oss (N 5120, K 2880): the new residual exact, y within bf16 rounding of the
    standalone norm + GEMV (compiled, the sum of squares may be ordered differently: a few y
    elements one ulp apart), then the same launch captured and replayed in a CUDA graph."""
    n, k = 5120, 2880
    torch.manual_seed(m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    r = (10 * torch.randn(m, k, device="cuda")).to(torch.bfloat16) if residual else None
    scale = 0.5 + torch.rand(k, device="cuda")
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y, s = norm_linear_small(x, r, scale, EPS, w, b)
    h, s_want = rmsnorm(x, scale, EPS, r)
    assert torch.equal(s, s_want)
    want = linear_small(h, w, b, choose_norm_tiles(m, n, k)).float()
    assert ((y.float() - want).norm() / want.norm()).item() < 1e-3
    assert (y.float() != want).float().mean().item() < 0.05  # nearly all bits equal
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, _ = norm_linear_small(x, r, scale, EPS, w, b)
        out.copy_(got)
    x.copy_(torch.randn_like(x))  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    y2, _ = norm_linear_small(x, r, scale, EPS, w, b)
    assert torch.equal(out, y2)  # replay = eager, deterministic
