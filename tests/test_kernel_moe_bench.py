"""bench/moe.py's whole code path on the CPU (--smoke: toy shape, interpreted kernels): it must
produce one well-formed result line per token count, with the fields the results file promises."""

from __future__ import annotations

import json
from pathlib import Path

from bench.moe import main


def test_smoke_run_writes_one_result_line_per_token_count(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "moe.jsonl"
    main(["--smoke", "--tokens", "1,3", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in lines] == [1, 3]
    for r in lines:
        assert r["bench"] == "moe" and r["shape"] == "smoke" and r["device"] == "cpu-smoke"
        assert r["us"] > 0 and r["roofline_us"] > 0 and r["commit"] and r["date"]
        tile_path = {"router", "route", "gemm1", "gemm2", "combine"}
        assert set(r["stages_us"]) in (tile_path, {"router", "route", "gemv"})  # small T: GEMV
    assert "== MoE layer summary ==" in capsys.readouterr().out
