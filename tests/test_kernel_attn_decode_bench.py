"""bench/attn_decode.py's whole code path on the CPU (BENCH_DEVICE=cpu: toy heads, interpreted):
every candidate of its layer kind checked and timed beside SERVING, and a candidate that gives
a wrong answer is named, left untimed, and fails the run."""

from __future__ import annotations

import pytest

import bench.attn_decode as bench
import bench.common as common
from kernels.decode_latency import FULL, WINDOW


def test_smoke_run_times_every_candidate_on_its_layer_kind(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    rows = bench.main(["--only", "win_bn128,full_s16_once"])
    got = {(r["kind"], r["batch"], r["variant"]) for r in rows}
    assert got == {(k, b, n) for b in (1, 2) for k, n in [
        ("window", "serving"), ("window", "win_bn128"), ("full", "serving"),
        ("full", "full_s16_once")]}
    for r in rows:
        assert r["bench"] == "attn_decode" and r["us"] > 0 and r["us_hot"] > 0
        assert r["roofline_us"] > 0 and r["programs_with_keys"] <= r["programs"]
    assert "WRONG" not in capsys.readouterr().out


def test_a_wrong_candidate_is_named_and_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "DEVICE", "cpu")
    real = bench.decode_attention

    def broken(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kw)
        return out + 1 if kw.get("config") is FULL["full_once32"] else out

    monkeypatch.setattr(bench, "decode_attention", broken)
    timed = []
    monkeypatch.setattr(bench, "time_kind", lambda kind, cands, *a: timed.append(dict(cands)) or [])
    monkeypatch.setattr(bench, "print_table", lambda rows: None)
    with pytest.raises(SystemExit, match="full/full_once32"):
        bench.main(["--only", "full_once32,win_sink"])
    assert all("full_once32" not in cands for cands in timed)
    assert any("win_sink" in cands for cands in timed) and len(WINDOW) > 1
