"""Server interceptors: bearer-token auth; unexpected exceptions → INTERNAL, unparseable requests →
INVALID_ARGUMENT (never UNKNOWN).

grpc.aio turns an exception escaping a handler into UNKNOWN with the exception text; clients cannot
act on that and it may leak internals. The error interceptor wraps every handler: deliberate aborts
pass through, anything else is logged with a request id and answered with INTERNAL.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc

log = logging.getLogger(__name__)

# Health must stay reachable without credentials: Kubernetes' gRPC probes cannot send any.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)
WRAPPED_PREFIX = "/gptoss.v1."


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {k.lower(): v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


def _abort_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN202
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but health checks."""

    def __init__(self, token: str, on_error: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_error = on_error

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(PUBLIC_PREFIXES):
            return await continuation(details)
        got = _metadata(details).get("authorization", "").encode()
        if hmac.compare_digest(got, self._expected):
            return await continuation(details)
        if self._on_error:
            self._on_error("UNAUTHENTICATED")
        handler = await continuation(details)
        if handler is None:
            return None
        message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):  # noqa: ANN202
    """A handler of the same shape as `handler` that only aborts."""

    async def unary(request, context):  # noqa: ANN001, ANN202
        await context.abort(code, message)

    async def stream(request, context):  # noqa: ANN001, ANN202
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler if not handler.request_streaming else (
            grpc.stream_stream_rpc_method_handler)
        return make(stream, handler.request_deserializer, handler.response_serializer)
    make = grpc.unary_unary_rpc_method_handler if not handler.request_streaming else (
        grpc.stream_unary_rpc_method_handler)
    return make(unary, handler.request_deserializer, handler.response_serializer)


class _Undecodable:
    """Stands in for a request whose bytes do not parse (the handler answers INVALID_ARGUMENT)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    # grpc.aio answers a deserializer's exception with UNKNOWN before any handler runs, so parse
    # errors are handed to the handler as a value instead.
    if deserializer is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, mostly
            return _Undecodable(exc)

    return parse


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to INTERNAL with an error id in the log and message, and
    requests that are not valid protobuf to INVALID_ARGUMENT."""

    def __init__(self, on_error: Callable[[str], None] | None = None) -> None:
        self._on_error = on_error

    async def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        handler = await continuation(details)
        if handler is None or not details.method.startswith(WRAPPED_PREFIX):
            return handler  # health and reflection are library code with their own conventions
        method = details.method
        on_error = self._on_error

        async def internal(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            error_id = uuid.uuid4().hex[:12]
            log.error("unexpected error in %s (error id %s)", method, error_id, exc_info=exc)
            if on_error:
                on_error("INTERNAL")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); see server log"
            )

        async def undecodable(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
            if on_error:
                on_error("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid message for {method}: {request.error}")

        def deliberate(exc: Exception, context: grpc.aio.ServicerContext) -> bool:
            # context.abort() raises AbortError after setting the code: let that through.
            if isinstance(exc, grpc.aio.AbortError):
                return True
            code = context.code()
            return code is not None and code != grpc.StatusCode.OK

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):  # noqa: ANN001, ANN202
                if isinstance(request, _Undecodable):
                    await undecodable(context, request)
                try:
                    return await inner(request, context)
                except Exception as exc:
                    if deliberate(exc, context):
                        raise
                    await internal(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _lenient(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):  # noqa: ANN001, ANN202
                if isinstance(request, _Undecodable):
                    await undecodable(context, request)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except Exception as exc:
                    if deliberate(exc, context):
                        raise
                    await internal(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _lenient(handler.request_deserializer), handler.response_serializer
            )
        return handler  # streaming requests: none in this API
