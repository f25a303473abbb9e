"""Turning per-request records into the figures users compare: latency percentiles, throughput,
errors by code; a text table; the `bench: load` JSON lines.

Latencies are in milliseconds everywhere in the output (`unit: ms`). TTFT is from sending the
request to its first token; ITL is the gap between consecutive tokens of one stream (a message
carrying k tokens counts k gaps of 1/k of its wait); e2e is from sending to the last message.
Throughput divides by the wall time from the first request sent to the last one done. With a
fixed concurrency that wall time ends with a drain (no new requests, the long-tailed last few
finishing at small batch sizes), so `steady_output_tok_s` also counts only the tokens that
arrived while every client still had a request in flight: up to the last request sent (the
window includes the start-up ramp; None when no request waited for a free client).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PERCENTILES = (50, 90, 99)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_new_tokens: int
    sent_s: float = 0.0  # since the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    finish: str = ""  # LENGTH, ABORTED, … (proto FinishReason name) when the stream ended
    error: str | None = None  # gRPC code name, or a FINISH_*/SHORT mismatch; None when OK

    @property
    def ok(self) -> bool:
        return self.error is None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """{'p50','p90','p99','mean','max'} in ms, plus 'count'; None where there is no sample."""
    out: dict[str, float | int | None] = {"count": len(values_s)}
    for q in PERCENTILES:
        out[f"p{q}"] = _ms(percentile(values_s, q))
    out["mean"] = _ms(sum(values_s) / len(values_s)) if values_s else None
    out["max"] = _ms(max(values_s)) if values_s else None
    return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 4)


def summarize(records: Sequence[RequestRecord], wall_s: float, concurrency: int,
              rate: float | None = None, client_cpu_s: float | None = None) -> dict:
    """One run's result: ttft, itl, e2e, throughput, errors (+ concurrency, finish reasons)."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in records)  # tokens delivered, failed streams too
    wall = max(wall_s, 1e-9)
    itl = [gap for r in done for gap in r.itl_s]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done
            if r.output_tokens > 1 and r.e2e_s is not None and r.ttft_s is not None]
    steady_end = max((r.sent_s for r in records), default=0.0)
    steady_tokens = sum(tokens_before(r, steady_end) for r in records)
    result = {
        "concurrency": concurrency,
        "rate": rate,
        "unit": "ms",
        "ttft": latency_summary([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl": latency_summary(itl),
        "tpot": latency_summary(tpot),
        "e2e": latency_summary([r.e2e_s for r in done if r.e2e_s is not None]),
        "throughput": {
            "requests": len(records),
            "completed": len(done),
            "failed": len(records) - len(done),
            "output_tokens": out_tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in done),
            "wall_s": round(wall_s, 4),
            "output_tok_s": round(out_tokens / wall, 2),
            "total_tok_s": round((out_tokens + sum(r.prompt_tokens for r in done)) / wall, 2),
            "requests_s": round(len(done) / wall, 4),
            # closed loop (no rate): before the drain; None when there is no such window
            "steady_output_tok_s": (round(steady_tokens / steady_end, 2)
                                    if rate is None and steady_end > 0
                                    and len(records) > concurrency else None),
            "steady_s": round(steady_end, 4),
        },
        "errors": dict(sorted(Counter(r.error for r in records if r.error).items())),
        "finish_reasons": dict(sorted(Counter(r.finish for r in records if r.finish).items())),
    }
    if client_cpu_s is not None:  # near 1.0: the bench client itself may be the bottleneck
        result["client_cpu_util"] = round(client_cpu_s / wall, 3)
    return result


def tokens_before(rec: RequestRecord, t_s: float) -> int:
    """Tokens of the stream that arrived before `t_s` (seconds since the run started), from its
    send time, TTFT and inter-token gaps."""
    if rec.ttft_s is None or rec.output_tokens == 0:
        return 0
    now = rec.sent_s + rec.ttft_s
    if now > t_s:
        return 0
    first = rec.output_tokens - len(rec.itl_s)  # tokens in the first message
    n = first
    for gap in rec.itl_s:
        now += gap
        if now > t_s:
            break
        n += 1
    return n


def table(results: Iterable[dict]) -> str:
    """A fixed-width text table, one row per concurrency level."""
    head = (f"{'conc':>5} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'steady':>8} {'req/s':>7} "
            f"{'ttft p50':>9} {'p99':>9} {'itl p50':>8} {'p99':>8} {'e2e p50':>9} {'p99':>9} {'cpu':>5}")
    rows = [head]
    for r in results:
        t, f = r["throughput"], _fmt
        rows.append(
            f"{r['concurrency']:>5} {t['requests']:>5} {t['failed']:>4} {t['output_tok_s']:>10.1f} "
            f"{f(t.get('steady_output_tok_s')):>8} {t['requests_s']:>7.2f} {f(r['ttft']['p50']):>9} {f(r['ttft']['p99']):>9} "
            f"{f(r['itl']['p50']):>8} {f(r['itl']['p99']):>8} {f(r['e2e']['p50']):>9} "
            f"{f(r['e2e']['p99']):>9} {r.get('client_cpu_util', float('nan')):>5.2f}"
        )
    rows.append("latencies in ms; steady: out tok/s before the drain (every client busy); cpu: "
                "the bench client's share of one core (near 1: client-bound)")
    return "\n".join(rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_line(result: dict, *, device: str, commit: str, model: str = "",
              date: str | None = None) -> dict:
    """The `bench: load` row of bench/results/load.jsonl for one concurrency level (ms)."""
    date = date or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t = result["throughput"]
    return {
        "bench": "load", "concurrency": result["concurrency"], "rate": result["rate"],
        "out_tok_s": t["output_tok_s"], "steady_out_tok_s": t.get("steady_output_tok_s"),
        "req_s": t["requests_s"],
        "ttft_p50": result["ttft"]["p50"], "ttft_p99": result["ttft"]["p99"],
        "itl_p50": result["itl"]["p50"], "itl_p99": result["itl"]["p99"],
        "e2e_p50": result["e2e"]["p50"], "requests": t["requests"], "failed": t["failed"],
        "errors": result["errors"], "unit": "ms", "model": model,
        "device": device, "commit": commit, "date": date,
    }


def append_lines(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append rows as JSON lines (sorted keys) to `path`, creating its folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return target
