"""The load generator: many concurrent StreamGenerate calls against a running server.

Fixed concurrency: N workers each send their next request as soon as the previous one ends (the
usual "N users" figure). Poisson arrivals (`rate`): requests arrive at exponential intervals and
start when fewer than N are in flight; latencies are measured from the moment a request is sent.
Streams spread over one channel (HTTP/2 connection) per 64 concurrent calls. Only grpc and the
generated stubs are needed (no torch), so the client can run anywhere.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from bench.lengths import RequestSpec
from bench.report import RequestRecord
from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc

STREAMS_PER_CHANNEL = 64
# Our own channels, not the process-wide shared subchannel: one TCP connection each.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1),
                   ("grpc.max_receive_message_length", 64 << 20)]


@dataclass(frozen=True)
class LoadConfig:
    target: str
    concurrency: int
    rate: float | None = None  # requests/s (Poisson); None: back to back
    temperature: float = 1.0  # seeded per request, so a run is reproducible
    timeout_s: float | None = 600.0  # per request
    time_limit_s: float | None = None  # stop sending new requests after this long
    token: str | None = None  # bearer token
    seed: int = 0  # Poisson arrival times

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be ≥ 1, got {self.concurrency}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")


class Progress:
    """A plain stderr progress line: rewritten in place on a terminal, every ~10% otherwise."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True) -> None:  # noqa: ANN001
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = self.failed = self.tokens = 0
        self.t0 = time.perf_counter()
        self._last_print = 0.0
        self._last_decile = -1

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.ok
        self.tokens += rec.output_tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * self.done // max(self.total, 1)
        due = (now - self._last_print >= 0.25 if self.tty
               else decile != self._last_decile and now - self._last_print >= 1.0)
        if due or self.done == self.total:
            self._last_print, self._last_decile = now, decile
            self._print(now)

    def _print(self, now: float) -> None:
        width = 24
        filled = width * self.done // max(self.total, 1)
        elapsed = now - self.t0
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"errors {self.failed}  {self.tokens / max(elapsed, 1e-9):.0f} tok/s  "
                f"{elapsed:.1f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def build(spec: RequestSpec, temperature: float) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(token_ids=spec.prompt_ids))
    req.sampling.temperature = temperature
    req.sampling.seed = spec.seed
    req.stopping.max_new_tokens = spec.max_new_tokens
    req.stopping.ignore_eos = True  # exact output lengths
    return req


async def one_request(stub: pb_grpc.GenerationStub, spec: RequestSpec, cfg: LoadConfig,
                      t0: float, metadata: tuple = ()) -> RequestRecord:
    """Stream one request, timing every message; errors become the record's code, never raise."""
    rec = RequestRecord(spec.index, len(spec.prompt_ids), spec.max_new_tokens)
    start = last = time.perf_counter()
    rec.sent_s = start - t0
    call = stub.StreamGenerate(build(spec, cfg.temperature), timeout=cfg.timeout_s,
                               metadata=metadata)
    try:
        async for msg in call:
            now = time.perf_counter()
            k = len(msg.token_ids)
            if k:
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.itl_s.extend([(now - last) / k] * k)
                last = now
                rec.output_tokens += k
            if msg.finish_reason:
                rec.finish = pb.FinishReason.Name(msg.finish_reason)
        rec.e2e_s = time.perf_counter() - start
        if rec.finish != "LENGTH":
            rec.error = f"FINISH_{rec.finish or 'NONE'}"
        elif rec.output_tokens != spec.max_new_tokens:
            rec.error = "SHORT"
    except grpc.aio.AioRpcError as exc:
        rec.error = exc.code().name
    except asyncio.CancelledError:
        call.cancel()
        raise
    return rec


async def run_load(
    specs: Sequence[RequestSpec], cfg: LoadConfig,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float, float]:
    """Run the workload; returns (records in completion order, wall seconds, client CPU seconds)."""
    metadata = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else ()
    n_channels = max(1, math.ceil(min(cfg.concurrency, max(len(specs), 1)) / STREAMS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(cfg.target, options=CHANNEL_OPTIONS)
                for _ in range(n_channels)]
    stubs = [pb_grpc.GenerationStub(ch) for ch in channels]
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    stop_at = None if cfg.time_limit_s is None else t0 + cfg.time_limit_s

    def finished(rec: RequestRecord) -> None:
        records.append(rec)
        if on_done is not None:
            on_done(rec)

    try:
        if cfg.rate is None:
            pending = iter(specs)  # shared: each worker takes the next request

            async def worker(w: int) -> None:
                stub = stubs[w % len(stubs)]
                for spec in pending:
                    if stop_at is not None and time.perf_counter() > stop_at:
                        return
                    finished(await one_request(stub, spec, cfg, t0, metadata))

            await asyncio.gather(*(worker(w) for w in range(min(cfg.concurrency, len(specs)))))
        else:
            await _poisson(specs, cfg, stubs, t0, stop_at, metadata, finished)
    finally:
        for ch in channels:
            await ch.close()
    return records, time.perf_counter() - t0, time.process_time() - cpu0


async def _poisson(specs, cfg, stubs, t0, stop_at, metadata, finished) -> None:  # noqa: ANN001
    rng = random.Random(cfg.seed)
    slots = asyncio.Semaphore(cfg.concurrency)
    tasks: list[asyncio.Task] = []
    arrival = t0

    async def send(i: int, spec: RequestSpec) -> None:
        try:
            finished(await one_request(stubs[i % len(stubs)], spec, cfg, t0, metadata))
        finally:
            slots.release()

    for i, spec in enumerate(specs):
        arrival += rng.expovariate(cfg.rate)
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop_at is not None and time.perf_counter() > stop_at:
            break
        await slots.acquire()
        tasks.append(asyncio.create_task(send(i, spec)))
    await asyncio.gather(*tasks)


async def wait_for_server(target: str, timeout_s: float = 60.0, token: str | None = None
                          ) -> pb.GetModelInfoResponse:
    """GetModelInfo, retried while the server is unreachable or still loading (UNAVAILABLE)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                return await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                               metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                       grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)
