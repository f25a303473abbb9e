"""The sweep plot: latency percentiles (left) and throughput (right) against concurrency.

matplotlib is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SERIES = (  # (metric, percentile, style)
    ("ttft", "p50", "o-"), ("ttft", "p99", "o--"),
    ("itl", "p50", "s-"), ("itl", "p99", "s--"),
    ("e2e", "p50", "^-"),
)


def plot_sweep(results: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Write a PNG of one bench run (one point per concurrency level) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results, key=lambda r: r["concurrency"])
    conc = [r["concurrency"] for r in rows]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for metric, q, style in SERIES:
        ys = [r[metric][q] for r in rows]
        if any(y is not None for y in ys):
            lat.plot(conc, [float("nan") if y is None else y for y in ys], style,
                     label=f"{metric.upper()} {q}")
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.set_title("latency")
    tok = [r["throughput"]["output_tok_s"] for r in rows]
    thr.plot(conc, tok, "o-", color="tab:green", label="output tokens/s")
    thr.set_ylabel("output tokens/s")
    thr.set_title("throughput")
    req_ax = thr.twinx()
    req_ax.plot(conc, [r["throughput"]["requests_s"] for r in rows], "x:", color="tab:gray",
                label="requests/s")
    req_ax.set_ylabel("requests/s")
    for ax in (lat, thr):
        ax.set_xlabel("concurrency")
        if len(conc) > 1 and conc[-1] / max(conc[0], 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8)
    handles = thr.get_legend_handles_labels()
    extra = req_ax.get_legend_handles_labels()
    thr.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    for r, t in zip(rows, tok, strict=True):
        thr.annotate(f"{t:.0f}", (r["concurrency"], t), textcoords="offset points",
                     xytext=(0, 6), ha="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
