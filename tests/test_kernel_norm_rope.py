"""rmsnorm and rope + KV-cache write (Triton, interpreted on CPU tensors) against their references.

CPU tensors make kernels/jit.py run the kernels in Triton's interpreter, whatever else this pytest
process imported first.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rope import rope_cache_write, rope_cache_write_ref
from runtime.config import preset
from runtime.rope import rope_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (5, 67), (3, 300)])
def test_rmsnorm_matches_reference(dtype, with_residual, shape) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    scale = torch.rand(shape[1], generator=g) + 0.5
    y, s = rmsnorm(x, scale, 1e-5, res)
    y_ref, s_ref = rmsnorm_ref(x, scale, 1e-5, res)
    assert y.dtype == dtype and s.dtype == dtype
    assert torch.equal(s, s_ref)  # the residual stream is bit-exact
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


def test_rmsnorm_reads_strided_rows() -> None:
    x = torch.randn(4, 96)[:, :64]  # row stride 96
    scale = torch.ones(64)
    torch.testing.assert_close(rmsnorm(x, scale)[0], rmsnorm_ref(x, scale)[0])


def test_rmsnorm_rejects_bad_inputs() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="scale"):
        rmsnorm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(x, torch.ones(8), 1e-5, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        rmsnorm(torch.randn(8), torch.ones(8))


def _qkv(t: int, nq: int, nkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as strided views of one fused qkv projection, like runtime/model.py."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (nq + 2 * nkv) * d, generator=g).to(dtype)
    q = qkv[:, : nq * d].view(t, nq, d)
    k = qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d)
    v = qkv[:, (nq + nkv) * d :].view(t, nkv, d)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cap", [64, 11])  # a full layer, and a ring that wraps
def test_rope_cache_write_matches_reference(dtype, cap) -> None:
    cfg = preset("tiny")
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = rope_table(cfg, 64)
    # slot 0: a 5-token chunk at 3..7; slot 2: one decode token at 40; slot 1: chunk 9..12
    positions = torch.tensor([3, 4, 5, 6, 7, 40, 9, 10, 11, 12])
    slots = torch.tensor([0, 0, 0, 0, 0, 2, 1, 1, 1, 1])
    q, k, v = _qkv(len(positions), nq, nkv, d, dtype)
    kc = torch.randn(4, cap, nkv, d).to(dtype)
    vc = torch.randn(4, cap, nkv, d).to(dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot = rope_cache_write(q, k, v, cos, sin, positions, slots, kc, vc)
    q_ref = rope_cache_write_ref(q, k, v, cos, sin, positions, slots, kc_ref, vc_ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(q_rot, q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(kc, kc_ref, rtol=tol, atol=tol)
    assert torch.equal(vc, vc_ref)  # values are copied, untouched rows stay as they were


def test_rope_cache_write_rejects_mismatched_caches() -> None:
    cfg = preset("tiny")
    cos, sin = rope_table(cfg, 16)
    q, k, v = _qkv(2, 4, 2, 16, torch.float32)
    bad = torch.zeros(3, 8, 3, 16)  # 3 KV heads, the tokens have 2
    with pytest.raises(ValueError, match="k_cache"):
        rope_cache_write(q, k, v, cos, sin, torch.tensor([0, 1]), torch.tensor([0, 0]), bad, bad)
    with pytest.raises(ValueError, match="positions"):
        good = torch.zeros(3, 8, 2, 16)
        rope_cache_write(q, k, v, cos, sin, torch.tensor([0]), torch.tensor([0, 0]), good, good)
