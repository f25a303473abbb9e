"""bench/norm_gemv.py's code path on the CPU (BENCH_DEVICE=cpu: toy shape, interpreted): every
variant timed per M, and a fused kernel that disagrees stops the run before any timing."""

from __future__ import annotations

import pytest

import bench.common as common
import bench.norm_gemv as bench


def test_smoke_run_times_fused_and_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    rows = bench.main(["--rows", "1,3"])
    assert [r["m"] for r in rows] == [1, 3]
    for r in rows:
        assert {"unfused", "fused", "fused fma_n4_k1024_w4"} <= set(r["us"])
        assert all(us > 0 for us in r["us"].values())


def test_a_wrong_fused_kernel_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    real = bench.norm_linear_small
    monkeypatch.setattr(bench, "norm_linear_small",
                        lambda *a: (real(*a)[0] * 1.1, real(*a)[1]))
    timed = []
    monkeypatch.setattr(bench, "time_rows", lambda *a: timed.append(a))
    with pytest.raises(SystemExit, match="disagrees"):
        bench.main(["--rows", "1"])
    assert timed == []
