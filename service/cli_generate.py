"""`gptoss-serve generate`: run one prompt on a local engine (or stream from a server with --server).

With --json the last line printed is one JSON object
`{"token_ids": [...], "text": "...", "finish_reason": "length|stop"}`.
"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "generate"
HELP = "Generate a completion for one prompt (locally, or from a running server with --server)."


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_int_list, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--model", help="checkpoint directory (default: the built-in tiny random model)")
    p.add_argument("--server", help="HOST:PORT of a running gptoss-serve; stream from it instead")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; --server)")
    p.add_argument("--auth-token-file", help="bearer token file for --server")
    p.add_argument("--tls-ca", help="CA certificate to verify --server's TLS")
    p.add_argument("--timeout", type=float, help="deadline in seconds for --server")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    if args.server:
        from service.client import stream_generate_cli

        return stream_generate_cli(args)
    import random

    from runtime.engine import Engine, EngineConfig
    from runtime.types import SamplingParams

    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            seed=args.seed if args.seed is not None else random.getrandbits(63),
        )
        engine = Engine(
            EngineConfig(
                model=args.model, device=args.device, dtype=args.dtype, max_slots=1,
                max_context=args.max_context, kernels=args.kernels,
            )
        )
        prompt = args.prompt_ids if args.prompt_ids is not None else engine.tokenizer.encode(args.prompt)
        out = engine.generate(
            prompt, sampling, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = engine.tokenizer.decode(list(out.token_ids), skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "token_ids": list(out.token_ids), "text": text, "finish_reason": out.finish_reason,
        }))
    else:
        print(text)
    return 0
