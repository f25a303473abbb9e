"""Decode attention with rope and the K/V cache write in one launch
(kernels/decode_rope_attention.py; Triton interpreted on CPU tensors, fp32 / fp16: the interpreter's
tl.dot on bf16 is wrong).

The fused launch must leave the caches with exactly the bits of rope_cache_write and give
decode_attention's output (same launch shape) to rounding, wherever the new key sits: alone
(position 0), first in its own block after many splits, inside a wrapped ring, beside rows of
other lengths and beside the dummy slot's padding rows. Also: its torch reference is the composed
reference, the arrival counters are left at zero, bad inputs raise ValueError, and it compiles
for the H100 (sm_90a) offline. GPU (-m gpu): the 20b shapes in bf16 against the two launches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import decode_variants as dv
from kernels.decode_attention import decode_attention
from kernels.decode_rope_attention import rope_decode_attention, rope_decode_attention_ref
from kernels.decode_variants import SERVING, DecodeVariant
from kernels.rope import apply_rope_ref, rope_cache_write, split_qkv

NQ, NKV, D = 8, 2, 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
# 16-key blocks, one block per split at least, up to 8 splits merged 2 partials per round
SMALL = DecodeVariant(block_n=16, min_blocks=1, max_splits=8, merge_splits=2)


def tables(positions: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """A rope table [P, d/2] like runtime/rope.py's (plain frequencies, a concentration ≠ 1)."""
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    return (1.1 * ang.cos()).float().contiguous(), (1.1 * ang.sin()).float().contiguous()


@dataclasses.dataclass
class Case:
    """Rows of new tokens (unrotated q/k/v as views of one qkv projection) over filled caches."""

    slots: list[int]
    positions: list[int]
    cap: int
    window: int
    dtype: torch.dtype
    n_slots: int = 4  # + the dummy slot (index n_slots)
    seed: int = 0
    d: int = D

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        b = len(self.slots)
        qkv = torch.randn(b, (NQ + 2 * NKV) * self.d, generator=g).to(self.dtype)
        self.q, self.k, self.v = split_qkv(qkv, NQ, NKV, self.d)
        shape = (self.n_slots + 1, self.cap, NKV, self.d)
        self.kc = torch.randn(shape, generator=g).to(self.dtype)
        self.vc = torch.randn(shape, generator=g).to(self.dtype)
        self.cos, self.sin = tables(max(self.positions) + 1, self.d)
        self.slot_ids, self.pos = torch.tensor(self.slots), torch.tensor(self.positions)
        self.sinks = torch.linspace(-2.0, 3.0, NQ)  # from negligible to dominant

    def args(self, kc: torch.Tensor, vc: torch.Tensor) -> tuple:
        return (self.q, self.k, self.v, self.cos, self.sin, kc, vc, self.slot_ids, self.pos,
                self.sinks, self.window, self.d**-0.5)


def fused(case: Case, cfg: DecodeVariant, splits: int | None):
    kc, vc = case.kc.clone(), case.vc.clone()
    out = rope_decode_attention(*case.args(kc, vc), config=cfg, num_splits=splits)
    return out, kc, vc


def unfused(case: Case, cfg: DecodeVariant, splits: int | None):
    """Today's two launches: rope_cache_write, then the fused-merge decode attention."""
    kc, vc = case.kc.clone(), case.vc.clone()
    q = rope_cache_write(case.q, case.k, case.v, case.cos, case.sin, case.pos, case.slot_ids,
                         kc, vc)
    out = decode_attention(q, kc, vc, case.slot_ids, case.pos, case.sinks, case.window,
                           case.d**-0.5, config=cfg, num_splits=splits)
    return out, kc, vc


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs included)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def counters_left() -> int:
    return int(dv.arrival_counters(1, torch.device("cpu")).abs().sum())


def check(case: Case, cfg: DecodeVariant = SMALL, splits: int | None = None,
          ref: bool = True) -> torch.Tensor:
    got, kc, vc = fused(case, cfg, splits)
    want, kc_want, vc_want = unfused(case, cfg, splits)
    assert same_bits(kc, kc_want) and same_bits(vc, vc_want)  # same bits, same places
    tol = TOL[case.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert counters_left() == 0
    if not ref:
        return got
    kc_ref, vc_ref = case.kc.clone(), case.vc.clone()
    ref = rope_decode_attention_ref(*case.args(kc_ref, vc_ref))
    assert same_bits(kc, kc_ref) and same_bits(vc, vc_ref)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_at_different_positions_over_several_splits(dtype: torch.dtype) -> None:
    """Full layer, 16-key blocks, 4 splits asked: position 63 (4 blocks, the new key last in the
    last one), 64 (its block holds only the new key: the last split reads no cache), 40 (3
    splits with work), 0 (the new key alone), 5 (one split, written directly)."""
    check(Case([0, 1, 2, 3, 4], [63, 64, 40, 0, 5], cap=80, window=0, dtype=dtype), splits=4)


def test_head_dim_32_halves_without_padding() -> None:
    """d = 16 (the tests above, the tiny model) pads each half to the products' depth of 16;
    from d = 32 on the halves are used as they are (the 20b's d = 64 path)."""
    check(Case([0, 1, 4], [47, 3, 0], cap=48, window=0, dtype=torch.float32, d=32), splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliding_window_on_a_wrapped_ring(dtype: torch.dtype) -> None:
    """Window 24 on a 32-entry ring: positions past the capacity (the ring wrapped once and
    more), a window edge p − W + 1 = 0, and the write landing on the index the window just left
    (p mod C where p − C was the oldest entry)."""
    check(Case([3, 0, 1, 2], [100, 23, 40, 6], cap=32, window=24, dtype=dtype), splits=2)


def test_position_zero_alone_reads_no_cache() -> None:
    """The only key is the new one: the output is its value (rounded like the loop's p·v),
    weighted against the sink; NaNs in the slot's cache change nothing (the kernels read no
    cache row; the torch reference would multiply them by zero weights, so it is left out)."""
    case = Case([1], [0], cap=16, window=0, dtype=torch.float32)
    case.kc[1].fill_(float("nan"))
    case.vc[1].fill_(float("nan"))
    out = check(case, SERVING, ref=False)
    assert torch.isfinite(out).all()
    cos, sin = case.cos[:1], case.sin[:1]
    q = apply_rope_ref(case.q, cos, sin)[0]  # [nq, d]
    k = apply_rope_ref(case.k, cos, sin)[0].repeat_interleave(NQ // NKV, dim=0)  # each head's
    v = case.v[0].repeat_interleave(NQ // NKV, dim=0)
    score = (q * k).sum(-1) * D**-0.5  # [nq]
    want = torch.sigmoid(score - case.sinks)[:, None] * v  # e^s v / (e^sink + e^s)
    torch.testing.assert_close(out[0], want, rtol=2e-5, atol=2e-5)


def test_many_splits_and_serving_config_single_split() -> None:
    """One long row over 8 splits (positions 127 and 112: the last block full / holding only
    the new key), then SERVING's own split choice (one split at these lengths)."""
    for p in (127, 112):
        check(Case([2], [p], cap=128, window=0, dtype=torch.float32), splits=8)
    check(Case([0, 2], [70, 9], cap=128, window=0, dtype=torch.float32), SERVING)


def test_dummy_slot_padding_rows_as_the_decode_graphs_use_them() -> None:
    """A decode graph pads its bucket with rows on the dummy slot at position 0 holding the same
    token (so the same q, k, v): they all write the dummy row's position 0 with the same bits,
    read no cache and agree with each other; the real rows are unaffected."""
    case = Case([1, 3, 4, 4, 4], [50, 17, 0, 0, 0], cap=64, window=0, dtype=torch.float32)
    for t in (case.q, case.k, case.v):
        t[3:] = t[2]  # the padding rows' token is the same
    got = check(case, splits=4)
    assert torch.equal(got[3], got[2]) and torch.equal(got[4], got[2])


def test_repeated_calls_leave_the_counters_at_zero() -> None:
    case = Case([0, 1], [60, 33], cap=64, window=0, dtype=torch.float32)
    first = fused(case, SMALL, 8)[0]
    again = fused(case, SMALL, 8)[0]
    assert torch.equal(first, again) and counters_left() == 0


def _bad(what: str) -> dict:
    case = Case([0], [3], cap=16, window=0, dtype=torch.float32)
    kw = dict(q=case.q, k=case.k, v=case.v, cos_table=case.cos, sin_table=case.sin,
              k_cache=case.kc, v_cache=case.vc, slot_ids=case.slot_ids, positions=case.pos,
              sinks=case.sinks, window=0, scale=D**-0.5)
    if what == "q_dims":
        kw["q"] = case.q[0]
    elif what == "kv_heads":
        kw["k"] = case.q[:, :3]
    elif what == "dtype":
        kw["v"] = case.v.half()
    elif what == "stride":
        kw["q"] = torch.randn(1, NQ, 2 * D)[..., ::2]
    elif what == "table":
        kw["cos_table"] = case.cos.double()
    elif what == "positions":
        kw["positions"] = torch.tensor([3, 4])
    elif what == "sinks":
        kw["sinks"] = case.sinks[:4]
    elif what == "window":
        kw["window"] = -1
    elif what == "caches":
        kw["v_cache"] = case.vc[:, :8]
    return kw


@pytest.mark.parametrize(("what", "match"), [
    ("q_dims", "q, k, v must be"), ("kv_heads", "KV heads"), ("dtype", "one dtype"),
    ("stride", "contiguous last"), ("table", "cos_table"), ("positions", "positions must be"),
    ("sinks", "sinks"), ("window", "window"), ("caches", "caches must both"),
])
def test_bad_inputs_raise_value_errors(what: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rope_decode_attention(**_bad(what))


@pytest.mark.parametrize("layer", ["full", "window"])
def test_compiles_for_the_h100_at_the_20b_shape_without_spills(layer: str) -> None:
    """sm_90a on the CPU (bench/decode_rope_compile.py), the serving launch shape with and
    without PDL: no spills (offline: 96 registers on full layers as the plain kernel, 128 on
    sliding ones where the plain kernel has 96)."""
    from bench.decode_rope_compile import compile_rope_decode
    from bench.norm_compile import usage

    for pdl_on in (False, True):
        regs, spill = usage(compile_rope_decode(SERVING, layer, pdl_on))
        assert regs <= 168 and spill == 0, (layer, pdl_on, regs, spill)


def _gpu_case(positions: list[int], cap: int, seed: int) -> dict:
    """20b heads (64 q, 8 KV, d 64) in bf16 on the GPU: q/k/v views of a qkv row, random
    caches of 4 slots + the dummy (slot 4)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nq, nkv, d, b = 64, 8, 64, len(positions)
    qkv = torch.randn(b, (nq + 2 * nkv) * d, device="cuda", generator=g).bfloat16()
    qkv[5:] = qkv[4:5]  # padding rows on the dummy slot hold one token, as a graph's do
    shape = (5, cap, nkv, d)
    cos, sin = tables(max(4096, max(positions) + 1), d)
    return dict(
        qkv=qkv, qkv_views=split_qkv(qkv, nq, nkv, d), cos=cos.cuda(), sin=sin.cuda(),
        kc=torch.randn(shape, device="cuda", generator=g).bfloat16(),
        vc=torch.randn(shape, device="cuda", generator=g).bfloat16(),
        slots=torch.tensor([0, 1, 2, 3, 4, 4][:b], device="cuda"),
        pos=torch.tensor(positions, device="cuda"),
        sinks=torch.linspace(-2.0, 3.0, nq, device="cuda"))


def _gpu_both(c: dict, window: int) -> tuple:
    q, k, v = c["qkv_views"]
    kc, vc = c["kc"].clone(), c["vc"].clone()
    got = rope_decode_attention(q, k, v, c["cos"], c["sin"], kc, vc, c["slots"], c["pos"],
                                c["sinks"], window, 0.125)
    kc2, vc2 = c["kc"].clone(), c["vc"].clone()
    q_rot = rope_cache_write(q, k, v, c["cos"], c["sin"], c["pos"], c["slots"], kc2, vc2)
    want = decode_attention(q_rot, kc2, vc2, c["slots"], c["pos"], c["sinks"], window, 0.125,
                            config=SERVING)
    return got, kc, vc, want, kc2, vc2


def _assert_same_caches(kc, vc, kc2, vc2) -> None:  # noqa: ANN001
    assert torch.equal(vc, vc2)  # a copy
    # the rotation's multiply-adds are rope.py's expressions; compiled, the contraction into
    # FMAs could still differ: nearly all bits equal, the rest one bf16 rounding apart
    same = (kc == kc2).float().mean().item()
    assert same > 0.999, same
    torch.testing.assert_close(kc.float(), kc2.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("window", "cap", "positions"), [
    (128, 255, [4095, 130, 127, 0]),  # a wrapped ring, the window's edge, position 0
    (0, 4096, [4095]),  # batch 1 at 4k: 16 splits with the serving shape, merged
    (0, 4096, [4095, 1000, 64, 0, 0, 0]),  # two padding rows on the dummy slot
])
def test_gpt_oss_20b_bf16_on_gpu_and_in_a_graph(window: int, cap: int,
                                               positions: list[int]) -> None:
    """The 20b attention in bf16, fused against rope_cache_write + decode_attention (SERVING):
    the same caches, outputs within bf16 rounding; then the fused launch captured in a CUDA
    graph and replayed at other positions gives the eager launch's output and caches."""
    c = _gpu_case(positions, cap, seed=1)
    got, kc, vc, want, kc2, vc2 = _gpu_both(c, window)
    _assert_same_caches(kc, vc, kc2, vc2)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    q, k, v = c["qkv_views"]
    kc_g, vc_g = c["kc"].clone(), c["vc"].clone()
    pos = c["pos"].clone()
    args = (q, k, v, c["cos"], c["sin"], kc_g, vc_g, c["slots"], pos, c["sinks"], window, 0.125)
    rope_decode_attention(*args)  # compiled and the counters allocated before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope_decode_attention(*args)
    pos.copy_(torch.clamp(c["pos"] - 37, min=0))
    kc_g.copy_(c["kc"])
    vc_g.copy_(c["vc"])
    graph.replay()
    torch.cuda.synchronize()
    c["pos"] = pos.clone()
    eager, kc_e, vc_e, _, _, _ = _gpu_both(c, window)
    assert torch.equal(kc_g, kc_e) and torch.equal(vc_g, vc_e)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert int(dv.arrival_counters(1, q.device).abs().sum()) == 0
