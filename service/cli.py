"""`gptoss-serve` command line: one subcommand per module, each with `add_parser` and `run`.

Subcommand modules stay small and import heavy things (torch, grpc) only when run, so `--help`
is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS = (
    "service.cli_bench",
    "service.cli_generate",
    "service.cli_make_checkpoint",
    "service.cli_serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-serve", description="Serve gpt-oss models over gRPC."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        sp = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
