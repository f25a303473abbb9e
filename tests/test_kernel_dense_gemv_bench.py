"""bench/dense_gemv.py's whole code path on the CPU (BENCH_DEVICE=cpu: toy shape, interpreted):
one row per M with every candidate timed, and a candidate that disagrees with F.linear stops the
run before any timing, by name."""

from __future__ import annotations

import pytest

import bench.common as common
import bench.dense_gemv as bench
from kernels.dense_gemv import CANDIDATES


def test_smoke_run_times_every_candidate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    rows = bench.main(["--rows", "1,3"])
    assert [(r["shape"], r["m"]) for r in rows] == [("smoke", 1), ("smoke", 3)]
    for r in rows:
        assert r["bench"] == "dense_gemv" and r["cublas_us"] > 0 and r["roofline_us"] > 0
        assert set(r["candidates_us"]) == set(CANDIDATES)
        assert all(us > 0 for us in r["candidates_us"].values())
    assert "== dense GEMV" in capsys.readouterr().out


def test_a_wrong_candidate_is_named_and_nothing_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    wrong = "fma_n2_k2048_w8"
    real = bench.linear_small

    def broken(x, w, b, tiles):  # noqa: ANN001, ANN202
        y = real(x, w, b, tiles)
        return y + 1 if tiles == CANDIDATES[wrong] else y

    monkeypatch.setattr(bench, "linear_small", broken)
    timed = []
    monkeypatch.setattr(bench, "time_shape", lambda *a: timed.append(a))
    with pytest.raises(SystemExit, match=wrong):
        bench.main(["--rows", "1"])
    assert timed == []
