"""The code-shape options of the fused qkv + rope launch (kernels/dense_gemv_rope_opts.py):
interpreted in float32/float16, every candidate gives the bits of the unfused Triton path
(norm_linear_small, then rope_cache_write); compiled for sm_90a at the 20b shape, the one-tile
candidates keep the plain GEMV's K loop (every load of a step in flight at once, no spills)."""

from __future__ import annotations

import pytest
import torch

from kernels.dense_gemv import GemvDenseTiles
from kernels.dense_gemv_rope import norm_linear_rope_small
from kernels.dense_gemv_rope_opts import CANDIDATES, DEFAULT, ENV, RopeGemvOpts, chosen
from tests.test_kernel_dense_gemv_rope import EPS, N8, Case, assert_same, written

OPTIONS = [name for name in CANDIDATES if name != "base"]


def fused(case: Case, pos: list[int], slots: list[int], opts: RopeGemvOpts,
          tiles: GemvDenseTiles | None = N8):  # noqa: ANN201
    kc, vc = case.kc.clone(), case.vc.clone()
    q, s = norm_linear_rope_small(
        case.x, case.r, case.scale, EPS, case.w, case.b, case.cos, case.sin, torch.tensor(pos),
        torch.tensor(slots), kc, vc, case.nq, tiles, opts)
    return q, s, kc, vc


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize(("dtype", "residual", "m", "pos", "slots", "shape"), [
    (torch.float32, True, 1, [5], [2], (4, 2, 16)),
    (torch.float16, True, 2, [3, 6], [1, 0], (2, 1, 64)),  # two sequences
    (torch.float16, False, 2, [6, 7], [1, 1], (4, 2, 16)),  # a two-token chunk, first layer
])
def test_every_option_gives_the_unfused_bits(
    name: str, dtype: torch.dtype, residual: bool, m: int, pos: list[int], slots: list[int],
    shape: tuple[int, int, int],
) -> None:
    case = Case(m, *shape, k=200, dtype=dtype, residual=residual, seed=m + shape[2])
    got = fused(case, pos, slots, CANDIDATES[name])
    assert_same(got, case.unfused(pos, slots))
    untouched = ~written(case, pos, slots)
    assert torch.equal(got[2][untouched], case.kc[untouched])
    assert torch.equal(got[3][untouched], case.vc[untouched])


@pytest.mark.parametrize("name", ["tile", "tile_late2", "late1"])
@pytest.mark.parametrize(("tiles", "m"), [
    (GemvDenseTiles(4, 64, 2, 2), 3),  # the register double buffer, 2 pairs per program
    (GemvDenseTiles(2, 32, 1, 1), 2),  # one pair per program
    (GemvDenseTiles(16, 64, 4, 1), 1),  # one program per head (d = 16)
])
def test_options_with_other_tiles(name: str, tiles: GemvDenseTiles, m: int) -> None:
    case = Case(m, 4, 2, 16, k=200, dtype=torch.float32, slots=8, seed=m)
    pos, slots = [3 * i + 1 for i in range(m)], list(range(m))
    assert_same(fused(case, pos, slots, CANDIDATES[name], tiles),
                case.unfused(pos, slots, tiles))


@pytest.mark.parametrize("name", ["tile_late1", "late2"])
def test_late_epilogue_wraps_the_ring(name: str) -> None:
    """Positions read after the loop still pick their own table row and ring index."""
    case = Case(2, 4, 2, 16, k=96, dtype=torch.float16, cap=8, seed=3)
    pos, slots = [8 * 3 + 5, 8 + 7], [0, 3]
    assert_same(fused(case, pos, slots, CANDIDATES[name]), case.unfused(pos, slots))


def test_the_environment_picks_a_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    # the default: the one-tile shape, timed fastest on an H100 (run 53)
    assert chosen() is DEFAULT and RopeGemvOpts(one_tile=True, epi_late=1) == DEFAULT
    monkeypatch.setenv(ENV, "base")
    assert chosen() == RopeGemvOpts()
    case = Case(1, 4, 2, 16, k=64, dtype=torch.float32)
    kc, vc = case.kc.clone(), case.vc.clone()
    q, _ = norm_linear_rope_small(case.x, case.r, case.scale, EPS, case.w, case.b, case.cos,
                                  case.sin, torch.tensor([3]), torch.tensor([1]), kc, vc, case.nq)
    assert torch.equal(q, case.unfused([3], [1])[0])
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match="GPTOSS_ROPE_GEMV"):
        chosen()


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="epi_late"):
        RopeGemvOpts(epi_late=3)


@pytest.mark.parametrize("m", [1, 2])
def test_one_tile_keeps_the_plain_gemv_loop_on_the_h100(m: int) -> None:
    """sm_90a on the CPU (bench/rope_compile.py), with a residual (the decode's case): the
    default's K loop at one row issues its loads in several dependent waves; the one-tile
    candidates issue every load of a step at once, as the plain norm GEMV, without spills."""
    import bench.norm_compile as nc
    from bench.rope_compile import loop_report, rope_variant, sass_of

    plain = loop_report(sass_of(nc.compile_dense(m, True, True, "bf16")))
    assert plain["waves"] == 1
    for name in ("tile", "tile_late1"):
        k = rope_variant(m, True, name)
        rep = loop_report(sass_of(k))
        assert nc.usage(k)[1] == 0, name
        assert rep["waves"] == 1 and rep["ldg"] == plain["ldg"], (name, rep)
        assert abs(rep["instr"] - plain["instr"]) <= 8, (name, rep, plain)
    if m == 1:  # the regression this option fixes
        assert loop_report(sass_of(rope_variant(1, True, "base")))["waves"] > 2
