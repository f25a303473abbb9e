"""One gpt-oss MoE layer (router + routing + two MXFP4 grouped GEMMs + combine) against its roofline.

    python -m bench.moe [--shapes 20b,120b] [--tokens 1,8,64,256,4096] [--sweep] [--out FILE]
                        [--routing par,seq]

At the start the run measures the device: copy bandwidth (1 GiB device-to-device copy) and the bf16
GEMM rate (torch matmul 8192³). roofline_us = max(bytes / bandwidth, FLOPs / GEMM rate) with
bytes = the experts actually hit (MXFP4 codes + scales + biases) + router weight + x in + y out,
FLOPs = 2·T·E·H (router) + 2·T·k·(2I·H + H·I).
Small batches (T ≤ 256) run inside one CUDA graph of 4 distinct layers × 5 repetitions, so every
call streams its weights from HBM (4 layers ≫ the 50 MB L2) and launch latency counts as it does
in the model's decode graph; larger ones run eagerly. --sweep tries every candidate tile config
(kernels/moe_configs.py) and keeps the fastest; a per-stage breakdown follows for the kept one:
each launch alone, 20 calls in one CUDA graph at every T (GPU time), and `host_*`: µs of Python
per eager call of the small stages (what an eager step pays on the CPU, GPU work not waited for).
--routing par,seq times the default config with each routing (kernels/moe_configs.ROUTINGS; "seq"
is the routing and combine placement before the "par" kernels), checks that both give the same
plan and the same layer output bits, and writes one line per routing.
One JSON line per (shape, tokens) is appended to bench/results/moe.jsonl (and --out, if given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import commit, cuda_time, graph_call_us, measure_peaks
from kernels.moe import ROUTES, moe_experts, moe_forward, prepare_moe, router_logits
from kernels.moe_configs import ROUTINGS, MoEConfig, candidates, choose_config, previous_routing
from kernels.moe_gemm import combine, gemm1_swiglu, gemm2_scale
from kernels.moe_ref import experts_ref
from kernels.moe_router import fits, route_fused
from kernels.moe_routing import RoutingPlan, route
from runtime.config import ModelConfig
from runtime.model_weights import LayerWeights
from runtime.synthetic import random_layer

RESULTS = Path(__file__).parent / "results" / "moe.jsonl"
SHAPES = {"20b": 32, "120b": 128}
GRAPH_MAX_TOKENS = 256
LAYERS, REPS = 4, 5
# --smoke: the same code path on the CPU (interpreted kernels) at a toy shape, to test the bench
SMOKE = ModelConfig(hidden_size=64, intermediate_size=64, num_experts=8, num_hidden_layers=LAYERS,
                    vocab_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def elapsed_us(fn: Callable[[], object], iters: int) -> float:
    return cuda_time(fn, iters=iters, warmup=0) * 1e6


def timed(fn: Callable[[int], object], tokens: int) -> float:
    if not torch.cuda.is_available():
        return elapsed_us(lambda: fn(0), 1)
    if tokens <= GRAPH_MAX_TOKENS:
        return graph_call_us(fn, LAYERS * REPS)
    for i in range(LAYERS):
        fn(i)
    torch.cuda.synchronize()
    return elapsed_us(lambda: [fn(i) for i in range(LAYERS)], 3) / LAYERS


def reference(cfg: ModelConfig, layer: LayerWeights, x: torch.Tensor,
              fused_router_counter: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle's experts (fp32) on the kernels' own routing: the fused router's when a
    counter is given (its logits may differ by an ulp, and so its choice on near ties)."""
    k = cfg.experts_per_token
    if fused_router_counter is not None and fits(x.shape[0], k, cfg.num_experts):
        plan = route_fused(x, layer.gate_weight, layer.gate_bias, k, 16, fused_router_counter)
    else:
        plan = route(router_logits(x, layer), k, 16)
    return experts_ref(
        x, plan.weights, plan.experts.long(), layer.mlp1_blocks, layer.mlp1_scales,
        layer.mlp1_bias, layer.mlp2_blocks, layer.mlp2_scales, layer.mlp2_bias,
    ).float()


def roofline(cfg: ModelConfig, layer: LayerWeights, x: torch.Tensor, bw: float, rate: float
             ) -> tuple[float, int, float]:
    """(roofline µs, experts hit, FLOPs) for this batch's real routing."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    t = x.shape[0]
    plan = route(router_logits(x, layer), k, 16)
    hit = int((plan.counts > 0).sum())
    per_expert = (2 * i * h // 2 + 2 * i * h // 32 + 2 * i * 4) + (h * i // 2 + h * i // 32 + h * 4)
    nbytes = hit * per_expert + e * h * 2 + e * 2 + 2 * t * h * 2
    flops = 2 * t * e * h + 2 * t * k * (2 * i * h + h * i)
    return max(nbytes / bw, flops / rate) * 1e6, hit, flops


def graph_or_once_us(fn: Callable[[int], object]) -> float:
    """GPU µs per call: 20 calls in one CUDA graph (on the CPU: one eager call, for --smoke)."""
    if not torch.cuda.is_available():
        return elapsed_us(lambda: fn(0), 1)
    return graph_call_us(fn, LAYERS * REPS)


def host_us(fn: Callable[[int], object], calls: int = LAYERS * REPS) -> float:
    """Python µs per eager call (launches queued, GPU not waited for)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    us = (time.perf_counter() - t0) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return us


def stages_us(cfg: ModelConfig, layers: list[LayerWeights], prepared: list, x: torch.Tensor,
              mc: MoEConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Each launch on its own, inputs precomputed, GPU µs in a graph: (the layer's stages, extras:
    host_* = Python µs per eager call; the combine on its own or GEMM 2 with it fused where the
    config does the other)."""
    k, t, n = cfg.experts_per_token, x.shape[0], len(layers)
    route_fn = ROUTES[mc.routing]
    logits = [router_logits(x, la) for la in layers]
    plans = [route_fn(lg, k, mc.block_m) for lg in logits]
    small = {
        "router": lambda j: router_logits(x, layers[j % n]),
        "route": lambda j: route_fn(logits[j % n], k, mc.block_m),
    }
    if mc.gemv is not None:  # the GEMV path's three launches timed together
        stages = {name: graph_or_once_us(fn) for name, fn in small.items()}
        stages["gemv"] = graph_or_once_us(lambda j: moe_experts(
            x, plans[j % n], prepared[j % n], k, mc, cfg.swiglu_alpha, cfg.swiglu_limit))
        return stages, {f"host_{name}": host_us(fn) for name, fn in small.items()}
    fast = mc.fast and prepared[0].fast_ok
    acts = [gemm1_swiglu(x, p.w1, p.s1, p.b1, pl, k, cfg.swiglu_alpha, cfg.swiglu_limit,
                         mc.gemm1, fast) for p, pl in zip(prepared, plans, strict=True)]
    ys = [gemm2_scale(a, p.w2, p.s2, p.b2, pl, mc.gemm2, fast, x.dtype)
          for a, p, pl in zip(acts, prepared, plans, strict=True)]
    p, pl, a, y = prepared, plans, acts, ys
    outs = [torch.empty_like(x) for _ in range(n)]

    def gemm2(j: int, fused: bool) -> torch.Tensor:
        extra = (outs[j % n], p[j % n].counters, k) if fused else ()
        return gemm2_scale(a[j % n], p[j % n].w2, p[j % n].s2, p[j % n].b2, pl[j % n],
                           mc.gemm2, fast, x.dtype, *extra)

    small["combine"] = lambda j: combine(y[j % n], pl[j % n], k, x.dtype)
    fused = mc.fuses_combine(t)
    stages = {name: graph_or_once_us(fn) for name, fn in small.items()}
    stages["gemm1"] = graph_or_once_us(lambda j: gemm1_swiglu(
        x, p[j % n].w1, p[j % n].s1, p[j % n].b1, pl[j % n], k, cfg.swiglu_alpha,
        cfg.swiglu_limit, mc.gemm1, fast))
    stages["gemm2"] = graph_or_once_us(lambda j: gemm2(j, fused))  # + the combine if fused
    extra = {f"host_{name}": host_us(fn) for name, fn in small.items()}
    if fused:  # summed inside GEMM 2 (timed there); what the launch alone would cost
        extra["combine_alone"] = stages["combine"]
        stages["combine"] = 0.0
    elif mc.fuse_combine:  # what fusing it would have cost at this size
        extra["gemm2_fused"] = graph_or_once_us(lambda j: gemm2(j, True))
    return {name: stages[name] for name in ("router", "route", "gemm1", "gemm2", "combine")}, extra


def same_plan(a: RoutingPlan, b: RoutingPlan) -> list[str]:
    """The plan fields whose bits differ."""
    names = ("weights", "experts", "counts", "pos", "sorted_pair", "tile_expert", "tile_start",
             "tile_end", "num_tiles")
    return [f for f in names if not torch.equal(getattr(a, f), getattr(b, f))]


def check_routings(cfg: ModelConfig, layer: LayerWeights, prepared, x: torch.Tensor,
                   default: MoEConfig, routings: list[str]) -> str:
    """Every routing's plan and layer output, bit for bit against the first's."""
    k = cfg.experts_per_token
    logits = router_logits(x, layer)
    first = routings[0]
    want = ROUTES[first](logits, k, default.block_m)
    want_out = moe_forward(x, layer, cfg, prepared, variant(default, first))
    notes = []
    for r in routings[1:]:
        diff = same_plan(ROUTES[r](logits, k, default.block_m), want)
        same_out = torch.equal(moe_forward(x, layer, cfg, prepared, variant(default, r)),
                               want_out)
        notes.append(f"{r} vs {first}: plan " + ("same" if not diff else f"DIFFERS {diff}")
                     + ", output " + ("same bits" if same_out else "DIFFERS"))
    return "; ".join(notes)


def variant(mc: MoEConfig, routing: str) -> MoEConfig:
    return previous_routing(mc) if routing == "seq" else replace(mc, routing=routing)


def run_shape(shape: str, tokens_list: list[int], sweep: bool, bw: float, rate: float,
              device: str, out: list[Path], compare_tk: bool = False,
              routings: tuple[str, ...] = ("par",), only: frozenset[str] = frozenset(),
              ) -> list[str]:
    on = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if on == "cuda" else torch.float16  # the interpreter's bf16 dot is off
    if shape == "smoke":
        cfg = SMOKE
    else:
        cfg = ModelConfig(num_hidden_layers=LAYERS, num_experts=SHAPES[shape])
    layers = [random_layer(cfg, j, seed=1, device=on, dtype=dtype) for j in range(LAYERS)]
    prepared = [prepare_moe(la, scale_words=sweep) for la in layers]  # sweep: words too
    tk = prepare_triton_kernels(layers) if compare_tk else None
    lines = []
    for t in tokens_list:
        g = torch.Generator(on).manual_seed(t)
        x = torch.randn(t, cfg.hidden_size, device=on, generator=g).to(dtype)
        roof_us, hit, flops = roofline(cfg, layers[0], x, bw, rate)
        default = choose_config(t, cfg.experts_per_token, cfg.num_experts)
        # A/B of routings: the default config with each, every one reported (else the fastest)
        ab = len(routings) > 1 or routings[0] != default.routing
        report = [f"default.{r}" for r in routings] if ab else []
        configs = ({n: variant(default, r) for n, r in zip(report, routings, strict=True)}
                   if ab else {"default": default})
        if sweep:
            configs |= {n: c for n, c in candidates(t, cfg.experts_per_token,
                                                     cfg.num_experts).items()
                        if not only or n in only}
        want = reference(cfg, layers[0], x)
        want_fr = reference(cfg, layers[0], x, prepared[0].counters[-1:])
        results: dict[str, float] = {}
        for name, mc in configs.items():
            try:
                got = moe_forward(x, layers[0], cfg, prepared[0], mc)
                ref = want_fr if mc.fused_router else want
                err = float((got.float() - ref).norm() / ref.norm())
                if not err < 1e-2:  # a fast wrong config must not win
                    print(f"  {shape} T={t} {name}: WRONG, relative error {err:.2e}")
                    continue
                results[name] = timed(lambda j, mc=mc, x=x: moe_forward(
                    x, layers[j % LAYERS], cfg, prepared[j % LAYERS], mc), t)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  {shape} T={t} {name}: failed: {type(exc).__name__}: {exc}"[:300])
        if not results:
            print(f"{shape:>5} {t:>5}  no config ran")
            continue
        check = ""
        if len(routings) > 1:
            check = check_routings(cfg, layers[0], prepared[0], x, default, list(routings))
            print(f"  {shape} T={t} {check}", flush=True)
        for best in [n for n in report if n in results] or [min(results, key=results.get)]:
            us = results[best]
            stages, extra = stages_us(cfg, layers, prepared, x, configs[best])
            tflops = flops / (us * 1e-6) / 1e12
            line = (f"{shape:>5} {t:>5} {us:9.1f} {roof_us:9.1f} {100 * roof_us / us:6.1f}% "
                    f"{tflops:7.1f} {hit:4d}  {best:<10} "
                    + " ".join(f"{k}={v:.1f}" for k, v in {**stages, **extra}.items()))
            print(line, flush=True)
            lines.append(line)
            write(out, dict(
                bench="moe", tokens=t, shape=shape, device=device, us=round(us, 2),
                roofline_us=round(roof_us, 2), commit=commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                backend="triton", config=best, experts_hit=hit, tflops=round(tflops, 1),
                routing=configs[best].routing, routing_check=check,
                stages_us={k: round(v, 2) for k, v in stages.items()},
                stages_extra_us={k: round(v, 2) for k, v in extra.items()},
                sweep_us={k: round(v, 2) for k, v in results.items()},
            ))
        if tk is not None:
            lines += run_triton_kernels(shape, cfg, layers, tk, x, want, roof_us, flops, device,
                                        out)
    return lines


def write(out: list[Path], record: dict) -> None:
    for path in out:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def prepare_triton_kernels(layers: list[LayerWeights]) -> list | None:
    """triton_kernels' weights for the comparison, or None (and why) when it cannot run."""
    from kernels.moe_triton_kernels import available, prepare_moe_tk

    ok, why = available()
    if not ok:
        print(f"  triton_kernels unavailable: {why}")
        return None
    try:
        return [prepare_moe_tk(la) for la in layers]
    except Exception as exc:  # noqa: BLE001 - its API moves between versions
        print(f"  triton_kernels: preparing weights failed: {type(exc).__name__}: {exc}"[:300])
        return None


def run_triton_kernels(shape: str, cfg: ModelConfig, layers: list[LayerWeights], tk: list,
                       x: torch.Tensor, want: torch.Tensor, roof_us: float, flops: int,
                       device: str, out: list[Path]) -> list[str]:
    from kernels.moe_triton_kernels import moe_forward_tk

    t = x.shape[0]
    try:
        got = moe_forward_tk(x, layers[0], cfg, tk[0])
        err = float((got.float() - want).norm() / want.norm())
        us = timed(lambda j: moe_forward_tk(x, layers[j % LAYERS], cfg, tk[j % LAYERS]), t)
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking our own kernels
        print(f"  triton_kernels T={t}: failed: {type(exc).__name__}: {exc}"[:300])
        return []
    line = (f"{shape:>5} {t:>5} {us:9.1f} {roof_us:9.1f} {100 * roof_us / us:6.1f}% "
            f"{flops / (us * 1e-6) / 1e12:7.1f}       triton_kernels (rel. error {err:.1e})")
    print(line, flush=True)
    write(out, dict(
        bench="moe", tokens=t, shape=shape, device=device, us=round(us, 2),
        roofline_us=round(roof_us, 2), commit=commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        backend="triton_kernels", rel_error=err,
    ))
    return [line]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="20b,120b")
    ap.add_argument("--tokens", default="1,8,64,256,4096")
    ap.add_argument("--sweep", action="store_true", help="try every candidate tile config")
    ap.add_argument("--only", default="", help="with --sweep: only these candidates, a,b,…")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    ap.add_argument("--routing", default="par",
                    help=f"routings of the default config to time, comma-separated {ROUTINGS}; "
                         "two or more: A/B with bit checks")
    ap.add_argument("--triton-kernels", action="store_true",
                    help="also time triton_kernels' matmul_ogs MoE (kernels/moe_triton_kernels)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, toy shape, interpreted kernels, results only to --out (tests)")
    args = ap.parse_args(argv)
    routings = tuple(args.routing.split(","))
    if not set(routings) <= set(ROUTINGS):
        raise SystemExit(f"--routing: choose from {ROUTINGS}, got {args.routing}")
    if args.smoke:
        device, bw, rate = "cpu-smoke", 1e11, 1e12
        args.shapes, out = "smoke", ([args.out] if args.out else [])
    elif not torch.cuda.is_available():
        raise SystemExit("bench.moe needs a CUDA GPU (or --smoke)")
    else:
        device = torch.cuda.get_device_name()
        peaks = measure_peaks()
        bw, rate = peaks.bandwidth, peaks.gemm
        out = [RESULTS] + ([args.out] if args.out else [])
        if os.environ.get("OUT"):  # the GPU runner's return folder, as bench.common.record
            out.append(Path(os.environ["OUT"]) / "moe.jsonl")
    only = frozenset(n for n in args.only.split(",") if n)
    if only and not args.sweep:
        ap.error("--only picks sweep candidates: give --sweep too")
    known = set(candidates(1, 4, 32)) | set(candidates(1, 4, 128)) | set(candidates(4096, 4, 32))
    if only - known:
        ap.error(f"--only: not candidates: {', '.join(sorted(only - known))}")
    print(f"{device}: copy {bw / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    header = (f"{'shape':>5} {'T':>5} {'us':>9} {'roof_us':>9} {'%roof':>7} {'TFLOP/s':>7} "
              f"{'hit':>4}  {'config':<10} stages (us, each alone)")
    print(header)
    lines = []
    for shape in args.shapes.split(","):
        lines += run_shape(shape, [int(t) for t in args.tokens.split(",")], args.sweep, bw,
                           rate, device, out, args.triton_kernels, routings,
                           only)
    print("\n== MoE layer summary ==")
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
