"""Exit 0 when a gptoss-serve instance answers SERVING on `grpc.health.v1.Health/Check`.

The container image's Docker HEALTHCHECK runs this; Kubernetes uses its native gRPC probes instead.
Stand-alone on purpose (only grpcio and grpcio-health-checking), so it also works as
`python deploy/healthcheck.py --port 50051` from a checkout.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout_s: float) -> str:
    """The serving status name (`SERVING`, `NOT_SERVING`, ...) that `target` reports for `service`."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--service", default="", help='"" (overall) or gptoss.v1.Generation')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        status = check(f"{args.host}:{args.port}", args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
