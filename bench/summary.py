"""Compact table of benchmark JSON lines: python -m bench.summary FILE.jsonl [FILE …]."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = []
    for p in paths:
        path = Path(p)
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        print("no results")
        return
    print(f"{'what':<22} {'shape':<28} {'measured':>14} {'roofline':>14} {'of roof':>8}")
    for r in rows:
        if "kernel" in r:
            what = r["kernel"]
            shape = " ".join(f"{k}={r[k]}" for k in ("batch", "context", "prompt", "tokens",
                                                      "mode") if k in r)
            got, roof = f"{r['us']:.1f} us", f"{r['roofline_us']:.1f} us"
            frac = r["roofline_us"] / r["us"] if r["us"] else 0.0
        else:
            what = f"{r['bench']} {r.get('shape', '')}"
            shape = f"batch={r['batch']} " + (f"ctx={r['context']}" if "context" in r
                                              else f"prompt={r['prompt']}")
            got, roof = f"{r['tok_s']:.0f} tok/s", f"{r['roofline_tok_s']:.0f} tok/s"
            frac = r["tok_s"] / r["roofline_tok_s"] if r["roofline_tok_s"] else 0.0
        print(f"{what:<22} {shape:<28} {got:>14} {roof:>14} {frac:8.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
