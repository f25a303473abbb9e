"""`gptoss-serve make-checkpoint`: write a seeded random gpt-oss checkpoint of a preset shape."""

from __future__ import annotations

import argparse

NAME = "make-checkpoint"
HELP = "Write a seeded random gpt-oss checkpoint (tiny, 20b or 120b shape) in either layout."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=("tiny", "20b", "120b"), default="tiny")
    parser.add_argument("--layout", choices=("original", "hf"), default="original")
    parser.add_argument("--unquantized", action="store_true",
                        help="HF layout only: store dense expert weights instead of MXFP4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=None,
                        help="shard size (default: one file up to 4 GiB, 4 GiB shards above)")
    parser.add_argument("--force", action="store_true",
                        help="replace safetensors files already in OUT_DIR")
    parser.add_argument("out_dir", metavar="OUT_DIR")


def run(args: argparse.Namespace) -> int:
    import logging

    from runtime.synthetic import make_checkpoint

    if args.unquantized and args.layout != "hf":
        raise SystemExit("make-checkpoint: --unquantized needs --layout hf")
    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else None
    try:
        out = make_checkpoint(args.shape, args.layout, args.seed, args.out_dir,
                              quantized=not args.unquantized, max_shard_bytes=shard,
                              overwrite=args.force)
    except FileExistsError as exc:
        raise SystemExit(f"make-checkpoint: {exc} (pass --force to replace it)") from None
    logging.getLogger(__name__).info(
        "wrote random %s checkpoint (%s layout, seed %d) to %s",
        args.shape, args.layout, args.seed, out,
    )
    print(out)
    return 0
