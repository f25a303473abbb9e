"""The gptoss.v1.Generation servicer: validate, tokenize, enqueue, stream deltas back."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc

from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc
from scheduler.request import FinishReason, Request, RequestOutput
from scheduler.scheduler import DuplicateRequest, QueueFull
from service import validation
from service.engine_loop import EngineLoop

log = logging.getLogger(__name__)

VERSION = "0.1.0"
FINISH = {
    FinishReason.LENGTH: pb.LENGTH, FinishReason.STOP: pb.STOP,
    FinishReason.STOP_SEQUENCE: pb.STOP_SEQUENCE, FinishReason.ABORTED: pb.ABORTED,
}
TOKENIZE_IN_THREAD_CHARS = 2048  # longer texts are tokenized off the event loop


@dataclass
class ServiceState:
    """What the servicer needs from the server; engine parts are None until loaded."""

    limits: validation.Limits | None = None
    engine_loop: EngineLoop | None = None
    tokenizer: object | None = None
    model_info: pb.GetModelInfoResponse | None = None
    draining: bool = False
    metrics: object | None = None  # service.metrics.Metrics


def _logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=t.token_id, logprob=t.logprob if t.logprob is not None else 0.0,
            top_logprobs=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in t.top_logprobs],
        )
        for t in out.logprobs
    ]


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one (b's finish, usage and error, if any)."""
    return replace(b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text,
                   logprobs=a.logprobs + b.logprobs)


def _message(request_id: str, out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=request_id, token_ids=out.token_ids, text=out.text, logprobs=_logprobs(out)
    )
    if out.finished:
        msg.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.CopyFrom(pb.Usage(
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            cached_prompt_tokens=out.cached_tokens,
        ))
    return msg


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def _fail(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str):  # noqa: ANN202
        if self.state.metrics is not None:
            self.state.metrics.on_error(code.name)
        await context.abort(code, msg)

    async def _ready(self, context: grpc.aio.ServicerContext) -> EngineLoop:
        if self.state.draining:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        loop = self.state.engine_loop
        if loop is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "model is still loading")
        if loop.failure is not None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "engine has failed")
        return loop

    async def _encode(self, text: str) -> list[int]:
        tok = self.state.tokenizer
        if len(text) > TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(tok.encode, text)
        return tok.encode(text)

    async def _start(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[str, asyncio.Queue[RequestOutput]]:
        engine_loop = await self._ready(context)
        limits = self.state.limits
        try:
            parsed = validation.parse(request, limits)
            ids = parsed.token_ids
            if ids is None:
                ids = tuple(await self._encode(parsed.text))
                if not ids:
                    raise validation.InvalidRequest("prompt text encodes to no tokens")
            validation.check_length(ids, parsed.stop, limits)
        except validation.InvalidRequest as exc:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rid = parsed.request_id or f"req-{uuid.uuid4().hex}"
        req = Request(rid, ids, parsed.sampling, parsed.stop, random_seed=parsed.random_seed)
        try:
            queue = engine_loop.submit(req)
        except QueueFull as exc:
            await self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except DuplicateRequest as exc:
            await self._fail(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        log.info("request=%s queued prompt_tokens=%d peer=%s", rid, len(ids), context.peer())
        return rid, queue

    async def _outputs(
        self, rid: str, queue: asyncio.Queue[RequestOutput], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; aborts it if the caller goes away (cancel, deadline)."""
        finished = False
        held: RequestOutput | None = None  # an error output read ahead: sent after the deltas
        try:
            while not finished:
                out, held = (held, None) if held is not None else (await queue.get(), None)
                while not out.finished and not queue.empty():
                    # Behind by a step or more (a slow reader, a busy event loop): one message
                    # for all that is ready — fewer writes exactly when writing is the bottleneck.
                    nxt = queue.get_nowait()
                    if nxt.finish_reason is FinishReason.ERROR:
                        held = nxt  # the tokens before an error still reach the client
                        break
                    out = _merge(out, nxt)
                finished = out.finished
                if finished:
                    log.info(
                        "request=%s finish=%s prompt_tokens=%d completion_tokens=%d "
                        "cached_tokens=%d", rid, out.finish_reason.value, out.prompt_tokens,
                        out.completion_tokens, out.cached_tokens,
                    )
                if out.finish_reason is FinishReason.ERROR:
                    log.error("request=%s failed: %s", rid, out.error)
                    await self._fail(
                        context, grpc.StatusCode.INTERNAL, f"request {rid} failed: {out.error}"
                    )
                yield out
        finally:
            if not finished:  # cancelled, deadline exceeded, or the stream was dropped
                remaining = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else (
                    "CANCELLED")
                log.info("request=%s caller went away (%s): aborting", rid, code)
                if self.state.metrics is not None:
                    self.state.metrics.on_error(code)
                self.state.engine_loop.abort(rid)

    async def Generate(self, request, context):  # noqa: ANN001, ANN201, N802
        rid, queue = await self._start(request, context)
        whole = pb.GenerateResponse(request_id=rid)
        texts: list[str] = []
        async for out in self._outputs(rid, queue, context):
            whole.token_ids.extend(out.token_ids)
            whole.logprobs.extend(_logprobs(out))
            texts.append(out.text)
            if out.finished:
                last = _message(rid, out)
                whole.finish_reason = last.finish_reason
                whole.usage.CopyFrom(last.usage)
        whole.text = "".join(texts)
        return whole

    async def StreamGenerate(self, request, context):  # noqa: ANN001, ANN201, N802
        rid, queue = await self._start(request, context)
        async for out in self._outputs(rid, queue, context):
            yield _message(rid, out)

    async def Abort(self, request, context):  # noqa: ANN001, ANN201, N802
        loop = self.state.engine_loop
        found = loop is not None and bool(request.request_id) and loop.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def Tokenize(self, request, context):  # noqa: ANN001, ANN201, N802
        if self.state.tokenizer is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "model is still loading")
        limits = self.state.limits
        if len(request.text.encode()) > limits.max_request_bytes:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, "text is too long")
        return pb.TokenizeResponse(token_ids=await self._encode(request.text))

    async def GetModelInfo(self, request, context):  # noqa: ANN001, ANN201, N802
        if self.state.model_info is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return self.state.model_info
