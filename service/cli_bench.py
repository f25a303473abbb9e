"""`gptoss-serve bench`: load-test a running server (TTFT, ITL, e2e, tokens/s, errors by code).

    gptoss-serve bench --server 127.0.0.1:50051 --concurrency 1,8,64 --requests 200 \
        --json out.json --plot out.png --record bench/results/load.jsonl

Exits 0 when every request completed, 3 when some failed (the figures are still written), 1 when
the server cannot be reached, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "bench"
DEFAULT_RECORD = str(Path(__file__).resolve().parent.parent / "bench" / "results" / "load.jsonl")
HELP = "Load-test a running server with concurrent streaming requests (ShareGPT-like lengths)."


def _levels(text: str) -> tuple[int | str, ...]:
    try:
        return tuple("max" if x.strip() == "max" else int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers or 'max', comma-separated: {text!r}") from None


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, comma-separated: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="HOST:PORT of a running gptoss-serve")
    p.add_argument("--concurrency", type=_levels, default=(8,),
                   help="requests in flight; a comma list sweeps (e.g. 1,8,64,256); 'max' = the "
                        "server's slots")
    p.add_argument("--requests", type=_counts, default=(100,),
                   help="requests per level: one count, or one per concurrency level")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s (default: back to back)")
    p.add_argument("--prompt-len-dist", default="sharegpt",
                   help="sharegpt | lognormal:MEDIAN:SIGMA | uniform:LO:HI | fixed:N (tokens)")
    p.add_argument("--output-len-dist", default="sharegpt", help="as --prompt-len-dist")
    p.add_argument("--seed", type=int, default=0, help="workload seed (lengths, ids, sampling)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests sent first")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--time-limit", type=float, default=None,
                   help="per level: stop sending new requests after this many seconds")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the server to be reachable and loaded")
    p.add_argument("--auth-token-file", help="file holding the server's bearer token")
    p.add_argument("--json", dest="json_out", help="write the full result JSON here")
    p.add_argument("--plot", help="write a PNG of latency and throughput against concurrency")
    p.add_argument("--record", action="append", nargs="?", const=DEFAULT_RECORD, default=[],
                   metavar="JSONL",
                   help="append a `bench: load` line per level to JSONL (default: the repository's "
                        "bench/results/load.jsonl); repeatable")
    p.add_argument("--device-name", help="device for --record (default: GetModelInfo's device)")
    p.add_argument("--commit", help="commit for --record (default: git rev-parse HEAD)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import grpc

    from bench.lengths import LengthDist
    from bench.report import append_lines, git_commit, load_line, table
    from bench.sweep import BenchOptions, run_bench

    try:
        token = (Path(args.auth_token_file).read_text().strip() if args.auth_token_file
                 else None)
        opts = BenchOptions(
            target=args.server, concurrency=args.concurrency, requests=args.requests,
            rate=args.rate, prompt_dist=LengthDist.parse(args.prompt_len_dist, "prompt"),
            output_dist=LengthDist.parse(args.output_len_dist, "output"), seed=args.seed,
            temperature=args.temperature, timeout_s=args.timeout, time_limit_s=args.time_limit,
            warmup=args.warmup, token=token, wait_s=args.wait, progress=not args.no_progress,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(run_bench(opts))
    except grpc.RpcError as exc:
        print(f"error: {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(table(out["results"]))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        from bench.plot import plot_sweep

        model = out["model"]
        plot_sweep(out["results"], args.plot,
                   title=f"{model.get('model', '')} on {args.device_name or model.get('device')}")
    if args.record:
        device = args.device_name or out["model"].get("device", "unknown")
        commit = args.commit or git_commit()
        rows = [load_line(r, device=device, commit=commit, model=out["model"].get("model", ""))
                for r in out["results"]]
        for path in args.record:
            append_lines(path, rows)
    failed = sum(r["throughput"]["failed"] for r in out["results"])
    return 0 if failed == 0 else 3
