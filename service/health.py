"""grpc.health.v1 and server reflection, degrading gracefully when their packages are missing.

Health matters to deployments (Kubernetes probes), so when grpcio-health-checking is not installed a
built-in servicer answers the same protocol; its messages are built at run time in a private
descriptor pool (no conflict with grpc_health if that is imported later). Reflection is a
convenience: without grpcio-reflection the server logs a warning and runs without it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger(__name__)

SERVICE_NAME = "gptoss.v1.Generation"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3  # grpc.health.v1 ServingStatus values


def _builtin_messages() -> tuple[type, type]:
    f = descriptor_pb2.FileDescriptorProto(
        name="gptoss_builtin/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=9, label=1)  # string
    resp = f.message_type.add(name="HealthCheckResponse")
    status = resp.enum_type.add(name="ServingStatus")
    for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2),
                         ("SERVICE_UNKNOWN", 3)):
        status.value.add(name=name, number=number)
    resp.field.add(name="status", number=1, type=14, label=1,  # enum
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
            get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")))


class _BuiltinHealth:
    """Check and Watch of grpc.health.v1 on an asyncio server."""

    def __init__(self) -> None:
        self.request_cls, self.response_cls = _builtin_messages()
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()

    async def set(self, service: str, status: int) -> None:
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def check(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return self.response_cls(status=self._status[request.service])

    async def watch(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201
        last = None
        while True:
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield self.response_cls(status=status)
                last = status
            await self._changed.wait()

    def handler(self) -> grpc.GenericRpcHandler:
        ser, de = self.response_cls.SerializeToString, self.request_cls.FromString
        return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.check, request_deserializer=de, response_serializer=ser),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=de, response_serializer=ser),
        })


class Health:
    """Overall ("") and per-service health, NOT_SERVING until `set_serving(True)`."""

    def __init__(self, server: grpc.aio.Server, force_builtin: bool = False) -> None:
        self._impl = None
        if not force_builtin:
            try:
                from grpc_health.v1 import health, health_pb2, health_pb2_grpc

                self._impl = health.aio.HealthServicer()
                health_pb2_grpc.add_HealthServicer_to_server(self._impl, server)
                self._status = {True: health_pb2.HealthCheckResponse.SERVING,
                                False: health_pb2.HealthCheckResponse.NOT_SERVING}
                self.builtin = False
            except ImportError:
                log.warning("grpcio-health-checking is not installed: using the built-in health")
        if self._impl is None:
            self._impl = _BuiltinHealth()
            server.add_generic_rpc_handlers((self._impl.handler(),))
            self._status = {True: SERVING, False: NOT_SERVING}
            self.builtin = True
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        for service in ("", SERVICE_NAME):
            await self._impl.set(service, self._status[serving])


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> bool:
    """Turn on server reflection; False (with a warning) when grpcio-reflection is missing."""
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        log.warning("grpcio-reflection is not installed: server reflection is off")
        return False
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    return True
