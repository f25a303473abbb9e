"""`gptoss-serve serve`: run the gRPC service (built-in tiny model unless --model)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

NAME = "serve"
HELP = "Serve a model over gRPC (gptoss.v1.Generation, health, reflection, /metrics)."

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the built-in tiny random model)")
    # Benchmarks: a preset shape (e.g. 20b) with seeded random weights made on the device.
    p.add_argument("--random-shape", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="HTTP port of /metrics (0 picks a free one, -1 disables)")
    p.add_argument("--port-file", help="write {\"port\": …, \"metrics_port\": …} here once bound")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    p.add_argument("--no-step-graphs", action="store_true",
                   help="run prompt-carrying steps eagerly (decode steps stay CUDA graphs)")
    p.add_argument("--max-slots", type=int, default=8, help="requests running at once")
    p.add_argument("--max-context", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--max-chunk-tokens", type=int, default=512, help="prefill chunk per request")
    p.add_argument("--max-step-tokens", type=int, default=2048, help="tokens per engine step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before refusing")
    p.add_argument("--prefill-batch-tokens", type=int, default=1536,
                   help="under load (≥ 32 streams decoding), admit new requests once their "
                        "prompts add up to this many tokens (0: at once)")
    p.add_argument("--prefill-max-wait-ms", type=float, default=250.0,
                   help="…or once the oldest waiting request has waited this long")
    p.add_argument("--no-overlap-scheduling", action="store_true",
                   help="read each step's tokens before planning the next (default: plan and "
                        "launch step n+1 while step n runs)")
    p.add_argument("--max-new-tokens-limit", type=int, default=None,
                   help="largest max_new_tokens accepted (default: the context)")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--auth-token-file",
                   help="file holding a bearer token clients must send (authorization metadata)")


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - a ServerConfig
    from service.config import ServerConfig

    token = None
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
    return ServerConfig(
        host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        model=args.model, random_shape=args.random_shape, device=args.device, dtype=args.dtype, kernels=args.kernels,
        cuda_graphs=not args.no_cuda_graphs, step_graphs=not args.no_step_graphs,
        max_slots=args.max_slots,
        max_context=args.max_context, max_chunk_tokens=args.max_chunk_tokens,
        max_step_tokens=args.max_step_tokens, max_queue=args.max_queue,
        prefill_batch_tokens=args.prefill_batch_tokens,
        prefill_max_wait_s=args.prefill_max_wait_ms / 1e3,
        overlap_scheduling=not args.no_overlap_scheduling,
        max_new_tokens_limit=args.max_new_tokens_limit, grace_period_s=args.grace_period,
        tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=token,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from service.server import serve

    try:
        return asyncio.run(serve(config, port_file=args.port_file))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
