"""A bench run: ask the server its limits, build the seeded workload, run each concurrency level.

Every level replays the same requests (same seed), so levels differ only in concurrency. The
result dict holds `config`, `model` (GetModelInfo), `results` (one entry per level) and, at the top,
the `ttft`, `itl`, `e2e`, `throughput`, `errors` of the last level run (the only one unless a sweep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from google.protobuf.json_format import MessageToDict

from bench.lengths import LengthDist, make_workload
from bench.load import LoadConfig, Progress, run_load, wait_for_server
from bench.report import summarize

TOP_KEYS = ("ttft", "itl", "tpot", "e2e", "throughput", "errors")


@dataclass(frozen=True)
class BenchOptions:
    target: str
    concurrency: tuple[int | str, ...] = (8,)  # ints, or "max" = the server's max_slots
    requests: tuple[int, ...] = (100,)  # one count for every level, or one per level
    rate: float | None = None
    prompt_dist: LengthDist = LengthDist.parse("sharegpt", "prompt")
    output_dist: LengthDist = LengthDist.parse("sharegpt", "output")
    seed: int = 0
    temperature: float = 1.0
    timeout_s: float | None = 600.0
    time_limit_s: float | None = None
    warmup: int = 0
    token: str | None = None
    wait_s: float = 60.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency:
            raise ValueError("give at least one concurrency level")
        for c in self.concurrency:
            if c != "max" and (not isinstance(c, int) or c < 1):
                raise ValueError(f"concurrency levels are integers ≥ 1 or 'max', got {c!r}")
        if len(self.requests) not in (1, len(self.concurrency)):
            raise ValueError(
                f"give one request count or one per concurrency level "
                f"({len(self.concurrency)}), got {len(self.requests)}"
            )
        if any(n < 1 for n in self.requests):
            raise ValueError(f"request counts must be ≥ 1, got {self.requests}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")


def resolve_levels(opts: BenchOptions, max_slots: int) -> list[tuple[int, int]]:
    """(concurrency, requests) per level; 'max' becomes max_slots; repeated levels run once."""
    counts = opts.requests * len(opts.concurrency) if len(opts.requests) == 1 else opts.requests
    levels: list[tuple[int, int]] = []
    for c, n in zip(opts.concurrency, counts, strict=True):
        conc = max_slots if c == "max" else int(c)
        if all(conc != seen for seen, _ in levels):
            levels.append((conc, n))
    return levels


async def run_bench(opts: BenchOptions) -> dict:
    info = await wait_for_server(opts.target, opts.wait_s, opts.token)
    limit = info.max_new_tokens_limit or info.max_context - 1

    def workload(n: int, seed: int) -> list:
        return make_workload(n, opts.prompt_dist, opts.output_dist, vocab_size=info.vocab_size,
                             max_context=info.max_context, max_new_limit=limit, seed=seed)

    levels = resolve_levels(opts, info.max_slots)
    if opts.warmup:  # compiles, graph captures and allocator growth happen here, not in a level
        conc = min(opts.warmup, max(c for c, _ in levels))
        await run_load(workload(opts.warmup, opts.seed + 1), _load_config(opts, conc))
    results = []
    for conc, n in levels:
        progress = Progress(n, f"concurrency {conc}", enabled=opts.progress)
        records, wall, cpu = await run_load(workload(n, opts.seed), _load_config(opts, conc),
                                            progress.update)
        progress.close()
        results.append(summarize(records, wall, conc, opts.rate, cpu))
    config = {k: v for k, v in asdict(opts).items() if k not in ("token", "progress")}
    config.update(prompt_dist=str(opts.prompt_dist), output_dist=str(opts.output_dist),
                  levels=[list(level) for level in levels])
    model = MessageToDict(info, preserving_proto_field_name=True,
                          always_print_fields_with_no_presence=True)
    return {"bench": "load", "config": config, "model": model, "results": results,
            **{k: results[-1][k] for k in TOP_KEYS}}


def _load_config(opts: BenchOptions, concurrency: int) -> LoadConfig:
    return LoadConfig(
        target=opts.target, concurrency=concurrency, rate=opts.rate,
        temperature=opts.temperature, timeout_s=opts.timeout_s, time_limit_s=opts.time_limit_s,
        token=opts.token, seed=opts.seed,
    )
