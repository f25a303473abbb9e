"""kernels/dense_gemv.linear_small (the decode-size projection) against F.linear, interpreted on the
CPU in float32 and float16 (the interpreter's bf16 dot is wrong; bf16 runs in the GPU test):
ragged N and K, with and without bias, strided x rows, every tile candidate, every rejection."""

from __future__ import annotations

import pytest
import torch

from kernels.dense_gemv import (
    CANDIDATES,
    DEFAULT,
    MAX_ROWS,
    GemvDenseTiles,
    choose_tiles,
    linear_small,
    linear_small_ref,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    want = linear_small_ref(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == x.dtype and got.shape == want.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 200), (40, 256)])  # 200 % 32 = 8; 256 a whole block
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = inputs(m, n, k, dtype)
    b = b if bias else None
    check(linear_small(x, w, b, GemvDenseTiles(8, 64, 2, 1)), x, w, b)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_candidate_matches_f_linear(name: str, dtype: torch.dtype) -> None:
    # K past one block of the largest candidate and ragged; N ragged below a dot block
    x, w, b = inputs(3, 21, 2056, dtype, seed=1)
    check(linear_small(x, w, b, CANDIDATES[name]), x, w, b)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_register_prefetch_matches_at_even_and_ragged_k(prefetch: int) -> None:
    tiles = GemvDenseTiles(4, 64, 2, prefetch)
    for k in (64, 192, 200):  # one block, several whole blocks, ragged tail
        x, w, b = inputs(5, 9, k, torch.float32)
        check(linear_small(x, w, b, tiles), x, w, b)


def test_default_tiles_and_choice() -> None:
    x, w, b = inputs(2, 33, 96, torch.float16)
    check(linear_small(x, w, b), x, w, b)
    assert choose_tiles(1, 5120, 2880) == DEFAULT
    assert all(choose_tiles(m, 2880, 4096) in CANDIDATES.values() for m in range(1, 9))


def test_strided_x_rows() -> None:
    x_wide, w, b = inputs(4, 19, 300, torch.float32)
    wide = torch.randn(4, 500)
    wide[:, 100:400] = x_wide
    x = wide[:, 100:400]  # stride(0) = 500 > K
    assert x.stride() == (500, 1)
    check(linear_small(x, w, b), x, w, b)


def test_bias_is_added_in_fp32_and_rounded_once() -> None:
    # x·wᵀ = 1 + 2⁻¹¹ lies halfway between two fp16 values: rounded before the bias it becomes 1
    # (ties to even) and 1 + 2⁻¹¹ rounds to 1 again; rounded once, 1 + 2⁻¹⁰ is exact.
    x = torch.tensor([[1.0, 2.0**-11]], dtype=torch.float16)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float16)
    b = torch.tensor([2.0**-11], dtype=torch.float16)
    assert linear_small(x, w, b).item() == 1.0 + 2.0**-10


def test_zero_rows_give_an_empty_result() -> None:
    x, w, b = inputs(0, 7, 64, torch.float32)
    y = linear_small(x, w, b)
    assert y.shape == (0, 7) and y.dtype == torch.float32


@pytest.mark.parametrize(
    "case,match",
    [
        ("too_many_rows", "at most 8 rows"),
        ("k_mismatch", "K differs"),
        ("dtype_mismatch", "must share"),
        ("int_dtype", "must share"),
        ("x_columns_strided", "contiguous"),
        ("w_columns_strided", "contiguous"),
        ("bias_shape", "bias must be"),
        ("bias_strided", "bias must be"),
        ("x_3d", r"\[M, K\]"),
        ("bias_device", "on meta"),
        ("w_device", "on meta"),
    ],
)
def test_rejections(case: str, match: str) -> None:
    x, w, b = inputs(2, 6, 32, torch.float32)
    args = {
        "too_many_rows": (torch.zeros(MAX_ROWS + 1, 32), w, b),
        "k_mismatch": (x[:, :16], w, b),
        "dtype_mismatch": (x.half(), w, b),
        "int_dtype": (x.int(), w.int(), b),
        "x_columns_strided": (torch.zeros(2, 64)[:, ::2], w, b),
        "w_columns_strided": (x, torch.zeros(6, 64)[:, ::2], b),
        "bias_shape": (x, w, torch.zeros(7)),
        "bias_strided": (x, w, torch.zeros(12)[::2]),
        "x_3d": (x[None], w, b),
        "bias_device": (x, w, torch.zeros(6, device="meta")),
        "w_device": (x, torch.zeros(6, 32, device="meta"), b),
    }[case]
    with pytest.raises(ValueError, match=match):
        linear_small(*args)


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_n=6, block_k=64, num_warps=2, num_stages=1),
        dict(block_n=8, block_k=16, num_warps=2, num_stages=1),
        dict(block_n=8, block_k=64, num_warps=3, num_stages=1),
        dict(block_n=8, block_k=64, num_warps=2, num_stages=3),
        dict(block_n=8, block_k=64, num_warps=2, num_stages=0),
        dict(block_n=8, block_k=64, num_warps=2, num_stages=3, dot=True),
        dict(block_n=64, block_k=1024, num_warps=4, num_stages=1),
    ],
)
def test_invalid_tiles_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        GemvDenseTiles(**kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(5120, 2880), (2880, 4096)])  # gpt-oss qkv, out
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gpt_oss_shapes_bf16_on_gpu_and_in_a_graph(n: int, k: int, m: int) -> None:
    torch.manual_seed(m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = linear_small_ref(x, w, b).float()
    for tiles in (None, *CANDIDATES.values()):
        got = linear_small(x, w, b, tiles).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, tiles
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    linear_small(x, w, b)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(linear_small(x, w, b))
    x.copy_(torch.randn_like(x))  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    want = linear_small_ref(x, w, b).float()
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2
