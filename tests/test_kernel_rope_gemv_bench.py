"""bench/rope_gemv.py's whole code path on the CPU (BENCH_DEVICE=cpu: toy shape, interpreted):
one row per M with the unfused path and every named candidate timed; a candidate that disagrees
with the unfused path stops the run before any timing, by name."""

from __future__ import annotations

import pytest

import bench.common as common
import bench.rope_gemv as bench


def test_smoke_run_times_the_unfused_path_and_every_candidate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    rows = bench.main(["--rows", "1,2"])
    assert [r["m"] for r in rows] == [1, 2]
    names = bench.OPTS.split(",")
    for r in rows:
        assert r["bench"] == "rope_gemv" and r["residual"]
        assert set(r["us"]) == {"unfused", *(f"fused {n}" for n in names)}
        assert all(us > 0 for us in r["us"].values())
    assert "fused tile_late1" in capsys.readouterr().out


def test_a_wrong_candidate_is_named_and_nothing_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    real = bench.norm_linear_rope_small

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        q, s = real(*args, **kwargs)
        return (q + 1 if args[-1] == bench.CANDIDATES["tile"] else q), s

    monkeypatch.setattr(bench, "norm_linear_rope_small", broken)
    timed = []
    monkeypatch.setattr(bench, "per_call_us", lambda *a: timed.append(a) or 1.0)
    with pytest.raises(SystemExit, match="fused tile M=1"):
        bench.main(["--rows", "1", "--opts", "base,tile"])
    assert not timed


def test_unknown_candidates_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--opts", "base,nope"])
