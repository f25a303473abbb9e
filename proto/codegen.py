"""Regenerate the committed Python stubs from `proto/gptoss/v1/generate.proto`.

The stubs are committed because some deploy targets install grpcio without grpcio-tools;
`tests/test_service_proto.py` regenerates them and fails when they differ from the committed ones.

Run from anywhere: `python -m proto.codegen` (needs grpcio-tools).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
PROTO = "proto/gptoss/v1/generate.proto"  # relative to ROOT: stubs import `proto.gptoss.v1`
STUBS = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs under `out_dir/proto/gptoss/v1/` and return their paths."""
    from grpc_tools import protoc  # only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    folder = out_dir / Path(PROTO).parent
    return [folder / name for name in STUBS]


def main() -> int:
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
