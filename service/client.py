"""Python client for gptoss.v1.Generation (sync and asyncio), and `generate --server` for the CLI.

    with GenerationClient("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_new_tokens=16, temperature=0).text)
        for delta in c.stream("Hello", max_new_tokens=16):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")
FINISH_NAMES = {pb.LENGTH: "length", pb.STOP: "stop", pb.STOP_SEQUENCE: "stop_sequence",
                pb.ABORTED: "aborted", pb.FINISH_REASON_UNSPECIFIED: ""}


def build_request(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    request_id: str = "",
    max_new_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    min_new_tokens: int | None = None,
    logprobs: int | None = None,
    top_logprobs: int | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest; sampling keywords are SamplingParams fields (None = server default)."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt (text) or token_ids")
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameters {sorted(unknown)}")
    req = pb.GenerateRequest(request_id=request_id)
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.token_ids.extend(token_ids)
    for name, value in sampling.items():
        if value is not None:
            setattr(req.sampling, name, value)
    st = req.stopping
    if max_new_tokens is not None:
        st.max_new_tokens = max_new_tokens
    if min_new_tokens is not None:
        st.min_new_tokens = min_new_tokens
    st.stop.extend(stop)
    st.stop_token_ids.extend(stop_token_ids)
    st.ignore_eos = ignore_eos
    if logprobs is not None:
        req.logprobs = logprobs
    if top_logprobs is not None:
        req.top_logprobs = top_logprobs
    return req


def _credentials(token: str | None, tls_ca: str | None):  # noqa: ANN202
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    creds = None
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    return metadata, creds


def _request(args: tuple, kwargs: dict) -> pb.GenerateRequest:
    if len(args) == 1 and isinstance(args[0], pb.GenerateRequest) and not kwargs:
        return args[0]
    if args and not isinstance(args[0], str):
        return build_request(None, args[0], **kwargs)
    return build_request(*args, **kwargs)


class GenerationClient:
    """Blocking client. `prompt` is text, a list of token ids, or a ready GenerateRequest."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | None = None,
                 timeout: float | None = None, tls_server_name: str | None = None) -> None:
        self._metadata, creds = _credentials(token, tls_ca)
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        self.channel = (grpc.secure_channel(target, creds, options) if creds is not None
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    def generate(self, *args: Any, **kwargs: Any) -> pb.GenerateResponse:
        return self.stub.Generate(_request(args, kwargs), timeout=self.timeout,
                                  metadata=self._metadata)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[pb.GenerateResponse]:
        """Deltas as they come; cancel with `.cancel()` on the returned call."""
        return self.stub.StreamGenerate(_request(args, kwargs), timeout=self.timeout,
                                        metadata=self._metadata)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout,
                               metadata=self._metadata).found

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=self.timeout,
                                       metadata=self._metadata).token_ids)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                      metadata=self._metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationClient:
    """asyncio client with the same methods (awaitables; `stream` is an async iterator)."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | None = None,
                 timeout: float | None = None) -> None:
        self._metadata, creds = _credentials(token, tls_ca)
        self.channel = (grpc.aio.secure_channel(target, creds) if creds is not None
                        else grpc.aio.insecure_channel(target))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    async def generate(self, *args: Any, **kwargs: Any) -> pb.GenerateResponse:
        return await self.stub.Generate(_request(args, kwargs), timeout=self.timeout,
                                        metadata=self._metadata)

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.StreamGenerate(_request(args, kwargs), timeout=self.timeout,
                                        metadata=self._metadata)
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()  # no-op when finished; aborts the request when the caller stops early

    async def abort(self, request_id: str) -> bool:
        resp = await self.stub.Abort(pb.AbortRequest(request_id=request_id),
                                     timeout=self.timeout, metadata=self._metadata)
        return resp.found

    async def tokenize(self, text: str) -> list[int]:
        resp = await self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=self.timeout,
                                        metadata=self._metadata)
        return list(resp.token_ids)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                            metadata=self._metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def stream_generate_cli(args: argparse.Namespace) -> int:
    """`gptoss-serve generate --server HOST:PORT …`: print text as it streams in.

    Reads args.prompt / args.prompt_ids, max_new_tokens, temperature, top_p, top_k, min_p, seed,
    ignore_eos, json, and optionally stop, auth_token_file, tls_ca, timeout.
    """
    token_file = getattr(args, "auth_token_file", None)
    token = Path(token_file).read_text().strip() if token_file else None
    sampling = {name: getattr(args, name, None) for name in SAMPLING_FIELDS}
    req = build_request(
        args.prompt, args.prompt_ids if args.prompt is None else None,
        max_new_tokens=args.max_new_tokens, ignore_eos=bool(getattr(args, "ignore_eos", False)),
        stop=getattr(args, "stop", None) or (), **sampling,
    )
    ids: list[int] = []
    text: list[str] = []
    finish = ""
    try:
        with GenerationClient(args.server, token=token, tls_ca=getattr(args, "tls_ca", None),
                              timeout=getattr(args, "timeout", None)) as client:
            for msg in client.stream(req):
                ids.extend(msg.token_ids)
                text.append(msg.text)
                if not args.json:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                if msg.finish_reason:
                    finish = FINISH_NAMES[msg.finish_reason]
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"token_ids": ids, "text": "".join(text), "finish_reason": finish}))
    else:
        sys.stdout.write("\n")
    return 0
