"""The qkv projection with its norm, rope and K/V cache write in one launch
(kernels/dense_gemv_rope.py), interpreted on the CPU in float32/float16: the rotated q, the cache
rows and the new residual stream are the bits of the unfused Triton path (norm_linear_small, then
rope_cache_write) and close to the torch oracle; every other cache row is untouched. The GPU test
at the gpt-oss-20b shape (bf16, and captured in a CUDA graph) runs with -m gpu.
"""

from __future__ import annotations

import pytest
import torch

from kernels.dense_gemv import CANDIDATES, GemvDenseTiles
from kernels.dense_gemv_norm import norm_linear_small
from kernels.dense_gemv_rope import norm_linear_rope_small, norm_linear_rope_small_ref
from kernels.rope import rope_cache_write

EPS = 1e-5
N8 = CANDIDATES["fma_n8_k512_w2"]  # the tiles the runtime takes at 1 and 2 rows


class Case:
    """One layer's inputs: x, residual, norm scale, qkv weights, rope tables, two caches."""

    def __init__(self, m: int, nq: int, nkv: int, d: int, k: int, dtype: torch.dtype,
                 residual: bool = True, slots: int = 3, cap: int = 8, seed: int = 0,
                 cache_dtype: torch.dtype | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.nq, self.nkv, self.d = nq, nkv, d
        n = (nq + 2 * nkv) * d
        self.x = torch.randn(m, k, generator=g).to(dtype)
        self.r = (10 * torch.randn(m, k, generator=g)).to(dtype) if residual else None
        self.scale = 0.5 + torch.rand(k, generator=g)
        self.w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        self.b = torch.randn(n, generator=g).to(dtype)
        angles = torch.rand(4 * cap, d // 2, generator=g) * 6.3  # any table will do
        self.cos, self.sin = 1.2 * angles.cos(), 1.2 * angles.sin()
        cdt = cache_dtype or dtype
        # caches full of noise: a write to a wrong row or head shows up
        self.kc = torch.randn(slots + 1, cap, nkv, d, generator=g).to(cdt)
        self.vc = torch.randn(slots + 1, cap, nkv, d, generator=g).to(cdt)

    def fused(self, pos: list[int], slots: list[int], tiles: GemvDenseTiles | None = N8,
              ids: torch.dtype = torch.long):  # noqa: ANN201
        kc, vc = self.kc.clone(), self.vc.clone()
        q, s = norm_linear_rope_small(
            self.x, self.r, self.scale, EPS, self.w, self.b, self.cos, self.sin,
            torch.tensor(pos, dtype=ids), torch.tensor(slots, dtype=ids), kc, vc, self.nq, tiles)
        return q, s, kc, vc

    def unfused(self, pos: list[int], slots: list[int], tiles: GemvDenseTiles | None = N8):  # noqa: ANN201
        """The Triton path the runtime takes without the fusion."""
        kc, vc = self.kc.clone(), self.vc.clone()
        y, s = norm_linear_small(self.x, self.r, self.scale, EPS, self.w, self.b, tiles)
        q, k, v = self.split(y)
        q = rope_cache_write(q, k, v, self.cos, self.sin, torch.tensor(pos), torch.tensor(slots),
                             kc, vc)
        return q, s, kc, vc

    def oracle(self, pos: list[int], slots: list[int]):  # noqa: ANN201
        kc, vc = self.kc.clone(), self.vc.clone()
        q, s = norm_linear_rope_small_ref(
            self.x, self.r, self.scale, EPS, self.w, self.b, self.cos, self.sin,
            torch.tensor(pos), torch.tensor(slots), kc, vc, self.nq)
        return q, s, kc, vc

    def split(self, y: torch.Tensor):  # noqa: ANN201
        m, nq, nkv, d = y.shape[0], self.nq, self.nkv, self.d
        return (y[:, : nq * d].view(m, nq, d), y[:, nq * d : (nq + nkv) * d].view(m, nkv, d),
                y[:, (nq + nkv) * d :].view(m, nkv, d))


def assert_same(got: tuple, want: tuple) -> None:
    for name, a, b in zip(("q", "residual", "k_cache", "v_cache"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max().item()}"


def written(case: Case, pos: list[int], slots: list[int]) -> torch.Tensor:
    """[S+1, C] True at the cache rows the call targets."""
    mask = torch.zeros(case.kc.shape[:2], dtype=torch.bool)
    for p, s in zip(pos, slots, strict=True):
        mask[s, p % case.kc.shape[1]] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(("m", "pos", "slots"), [
    (1, [5], [2]),
    (2, [3, 6], [1, 0]),  # two sequences
    (2, [6, 7], [1, 1]),  # a two-token chunk of one sequence
])
@pytest.mark.parametrize(("nq", "nkv", "d"), [(4, 2, 16), (2, 1, 64)])
def test_fused_rope_is_the_projection_then_rope_bit_for_bit(
    dtype: torch.dtype, residual: bool, m: int, pos: list[int], slots: list[int], nq: int,
    nkv: int, d: int,
) -> None:
    case = Case(m, nq, nkv, d, k=200, dtype=dtype, residual=residual, seed=m + d)
    got = case.fused(pos, slots)
    assert_same(got, case.unfused(pos, slots))
    q, s, kc, vc = got
    assert q.shape == (m, nq, d) and q.is_contiguous()
    if not residual:
        assert s is case.x  # the first layer: the stream is the embedding itself
    untouched = ~written(case, pos, slots)
    assert torch.equal(kc[untouched], case.kc[untouched])
    assert torch.equal(vc[untouched], case.vc[untouched])
    assert not torch.equal(kc[~untouched], case.kc[~untouched])
    # and near the torch oracle (its projection sums in another order)
    want = case.oracle(pos, slots)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliding_window_ring_wraps(dtype: torch.dtype) -> None:
    """Positions past the ring capacity C land at position mod C; the table row is the
    position's own."""
    case = Case(2, 4, 2, 16, k=96, dtype=dtype, cap=8, seed=3)
    pos, slots = [8 * 3 + 5, 8 + 7], [0, 3]  # ring indices 5 and 7, table rows 29 and 15
    got = case.fused(pos, slots)
    assert_same(got, case.unfused(pos, slots))
    hit = written(case, pos, slots)
    assert hit[0, 5] and hit[3, 7] and hit.sum() == 2
    for cache, before in ((got[2], case.kc), (got[3], case.vc)):
        assert torch.equal(cache[~hit], before[~hit])
        assert not torch.equal(cache[0, 5], before[0, 5])


@pytest.mark.parametrize(("tiles", "m"), [
    (GemvDenseTiles(8, 64, 2, 1), 2),  # several K steps with a ragged tail
    (GemvDenseTiles(4, 64, 2, 2), 3),  # the register double buffer, 2 pairs per program
    (GemvDenseTiles(2, 32, 1, 1), 2),  # one pair per program
    (None, 8),  # the runtime's choice for 8 rows (4 weight rows per program)
    (GemvDenseTiles(16, 64, 4, 1), 1),  # one program per head (d = 16)
])
def test_other_tiles_and_row_counts(tiles: GemvDenseTiles | None, m: int) -> None:
    case = Case(m, 4, 2, 16, k=200, dtype=torch.float32, slots=8, seed=m)
    pos, slots = [3 * i + 1 for i in range(m)], list(range(m))
    assert_same(case.fused(pos, slots, tiles), case.unfused(pos, slots, tiles))


def test_int32_ids_and_a_wider_cache_dtype() -> None:
    """int32 positions and slots; k and v rounded to the activation dtype, then stored in an
    fp32 cache, as rope_cache_write does."""
    case = Case(2, 4, 2, 16, k=64, dtype=torch.float16, cache_dtype=torch.float32, seed=9)
    pos, slots = [2, 11], [3, 1]
    assert_same(case.fused(pos, slots, ids=torch.int32), case.unfused(pos, slots))


def test_no_rows() -> None:
    case = Case(0, 4, 2, 16, k=64, dtype=torch.float32)
    q, s, kc, vc = case.fused([], [])
    assert q.shape == (0, 4, 16) and s.shape == (0, 64)
    assert torch.equal(kc, case.kc) and torch.equal(vc, case.vc)


def bad(case: Case, what: str) -> dict:
    args = dict(x=case.x, residual=case.r, scale=case.scale, eps=EPS, w=case.w, b=case.b,
                cos_table=case.cos, sin_table=case.sin, positions=torch.tensor([1, 2]),
                slot_ids=torch.tensor([0, 1]), k_cache=case.kc.clone(),
                v_cache=case.vc.clone(), num_heads=case.nq)
    change = {
        "rows": dict(x=torch.randn(9, 64), residual=None, positions=torch.zeros(9, dtype=torch.long),
                     slot_ids=torch.zeros(9, dtype=torch.long)),
        "heads": dict(num_heads=3),
        "odd_d": dict(k_cache=torch.zeros(4, 8, 2, 15), v_cache=torch.zeros(4, 8, 2, 15)),
        "dtype": dict(w=case.w.half()),
        "caches": dict(v_cache=case.vc[:, :4].clone()),
        "table": dict(cos_table=case.cos.double()),
        "positions": dict(positions=torch.tensor([1.0, 2.0])),
        "slots": dict(slot_ids=torch.tensor([0])),
        "tiles": dict(tiles=GemvDenseTiles(32, 64, 2, 1)),  # 16 pairs > d/2 = 8
        "dot": dict(tiles=CANDIDATES["dot_n16_k256_w4_s4"]),
        "bias": dict(b=case.b[:-1]),
    }[what]
    return {**args, **change}


@pytest.mark.parametrize(("what", "match"), [
    ("rows", "at most 8 rows"), ("heads", r"nq \+ 2·nkv"), ("odd_d", "even"),
    ("dtype", "must share"), ("caches", "v_cache"), ("table", "cos_table"),
    ("positions", "positions"), ("slots", "slot_ids"), ("tiles", "divides"), ("dot", "FMA"),
    ("bias", "bias"),
])
def test_bad_inputs_raise_value_errors(what: str, match: str) -> None:
    case = Case(2, 4, 2, 16, k=64, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        norm_linear_rope_small(**bad(case, what))


@pytest.mark.parametrize("m", [1, 2])
def test_compiles_for_the_h100_at_the_20b_shape(m: int) -> None:
    """sm_90a on the CPU (bench/norm_compile.py): at most one 4-byte spill, which ptxas places
    outside the K loop (a value saved before the prologue's row loop and reloaded once after it,
    offline SASS)."""
    from bench.norm_compile import compile_rope, usage

    for res, scale in ((True, "bf16"), (True, "fp32"), (False, "fp32")):
        regs, spill = usage(compile_rope(m, res=res, scale=scale))
        assert regs <= 168 and spill <= 4, (res, scale, regs, spill)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("residual", [True, False])
def test_gpt_oss_20b_bf16_on_gpu_and_in_a_graph(m: int, residual: bool) -> None:
    """The 20b qkv (hidden 2880, 64 q heads, 8 KV heads, d 64) in bf16: the new residual exact,
    q and the cache rows within bf16 rounding of the unfused kernels (compiled, the norm's sum of
    squares and the rotation's multiply-adds may round differently: nearly all bits equal), the
    rest of the caches untouched; then captured in a CUDA graph and replayed on new inputs."""
    from runtime.config import preset
    from runtime.rope import rope_table

    cfg = preset("20b")
    nq, nkv, d, k = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    assert (nq, nkv, d, k) == (64, 8, 64, 2880)
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(m)
    x = torch.randn(m, k, device=dev, dtype=bf)
    r = (10 * torch.randn(m, k, device=dev)).to(bf) if residual else None
    scale = 0.5 + torch.rand(k, device=dev)
    n = (nq + 2 * nkv) * d
    w = (torch.randn(n, k, device=dev) / k**0.5).to(bf)
    b = torch.randn(n, device=dev, dtype=bf)
    cos, sin = rope_table(cfg, 8192, dev)
    kc0 = torch.randn(5, 4096, nkv, d, device=dev, dtype=bf)
    vc0 = torch.randn_like(kc0)
    pos = torch.tensor([4100, 17][:m], device=dev)  # the first wraps the 4096-row ring
    slots = torch.tensor([3, 1][:m], device=dev)
    kc, vc, kc_want, vc_want = kc0.clone(), vc0.clone(), kc0.clone(), vc0.clone()
    q, s = norm_linear_rope_small(x, r, scale, EPS, w, b, cos, sin, pos, slots, kc, vc, nq)
    y, s_want = norm_linear_small(x, r, scale, EPS, w, b)
    qkv = y.view(m, nq + 2 * nkv, d)
    q_want = rope_cache_write(qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :], cos, sin,
                              pos, slots, kc_want, vc_want)
    assert torch.equal(s, s_want)
    idx = pos % kc.shape[1]
    for cache, before in ((kc, kc0), (vc, vc0)):  # only the targeted rows changed
        keep = torch.ones(kc.shape[:2], dtype=torch.bool, device=dev)
        keep[slots, idx] = False
        assert torch.equal(cache[keep], before[keep])
    for got, want in ((q, q_want), (kc[slots, idx], kc_want[slots, idx]),
                      (vc[slots, idx], vc_want[slots, idx])):
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 1e-3 and (got != want).float().mean().item() < 0.01
    q_ref, _ = norm_linear_rope_small_ref(x, r, scale, EPS, w, b, cos, sin, pos, slots,
                                          kc0.clone(), vc0.clone(), nq)
    assert ((q.float() - q_ref.float()).norm() / q_ref.float().norm()).item() < 1e-2
    out = torch.full_like(q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, _ = norm_linear_rope_small(x, r, scale, EPS, w, b, cos, sin, pos, slots, kc, vc, nq)
        out.copy_(got)
    x.copy_(torch.randn_like(x))  # new inputs and positions, same buffers
    pos.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    kc_want, vc_want = kc.clone(), vc.clone()
    q_want, _ = norm_linear_rope_small(x, r, scale, EPS, w, b, cos, sin, pos, slots, kc_want,
                                       vc_want, nq)
    assert torch.equal(out, q_want) and torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
