"""Server life cycle: bind, load the engine, serve, drain on SIGTERM.

`start_server(config)` binds first (health answers NOT_SERVING while the model loads), then loads and
warms the engine off the event loop and flips health to SERVING. `ServerHandle.drain()` is the
SIGTERM path: NOT_SERVING, refuse new requests with UNAVAILABLE, let in-flight requests finish within
the grace period, abort what is left, stop. `BackgroundServer` runs all that on its own thread and
event loop (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import grpc

from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc
from scheduler.scheduler import Scheduler, SchedulerConfig
from service import validation
from service.config import ServerConfig
from service.engine_loop import EngineLoop
from service.health import SERVICE_NAME, Health, enable_reflection
from service.interceptors import AuthInterceptor, ErrorInterceptor
from service.metrics import Metrics
from service.servicer import VERSION, GenerationServicer, ServiceState

log = logging.getLogger(__name__)


def build_engine(config: ServerConfig):  # noqa: ANN201 - a runtime.engine.Engine
    from runtime.engine import DTYPES, Engine, EngineConfig

    weights = None
    if config.random_shape is not None:  # generated on the device: no checkpoint on disk
        from runtime.config import preset
        from runtime.synthetic import random_weights

        weights = random_weights(preset(config.random_shape), seed=0, device=config.device,
                                 dtype=DTYPES[config.dtype])
    engine = Engine(EngineConfig(
        model=config.model, device=config.device, dtype=config.dtype, max_slots=config.max_slots,
        max_context=config.max_context, max_chunk_tokens=config.max_chunk_tokens,
        cuda_graphs=config.cuda_graphs, step_graphs=config.step_graphs, kernels=config.kernels,
    ), weights=weights)
    if config.warmup:
        engine.warmup(config.max_step_tokens)
    return engine


def _text_decoder(tokenizer):  # noqa: ANN001, ANN202
    params = inspect.signature(tokenizer.decode).parameters
    if "skip_special_tokens" in params:  # special tokens (EOS, pads) are not text
        return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids))


def _model_name(cfg: ServerConfig) -> str:
    if cfg.model:
        return Path(cfg.model).name
    return f"random-{cfg.random_shape}" if cfg.random_shape else "tiny-random"


class ServerHandle:
    def __init__(self, config: ServerConfig, server: grpc.aio.Server, port: int,
                 metrics: Metrics, health: Health, state: ServiceState) -> None:
        self.config = config
        self.server = server
        self.port = port
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.health = health
        self.state = state
        self.engine = None
        self.scheduler: Scheduler | None = None
        self.ready = asyncio.Event()
        self.load_error: BaseException | None = None
        self.stopped = asyncio.Event()
        self._load_task: asyncio.Task | None = None

    async def _load(self, engine) -> None:  # noqa: ANN001
        try:
            if engine is None:
                engine = await asyncio.to_thread(build_engine, self.config)
            self._attach(engine)
            await self.health.set_serving(True)
            self.ready.set()
            log.info("serving on port %d", self.port)
        except Exception as exc:
            log.exception("failed to load the engine")
            self.load_error = exc
            self.ready.set()

    def _attach(self, engine) -> None:  # noqa: ANN001
        cfg, mc = self.config, engine.model_config
        self.engine = engine
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_slots=engine.max_slots, max_context=engine.max_context,
                max_chunk_tokens=engine.max_chunk_tokens,
                max_step_tokens=max(cfg.max_step_tokens, engine.max_slots),
                max_queue=cfg.max_queue, prefix_reuse_slack=engine.prefix_reuse_slack,
                prefill_batch_tokens=cfg.prefill_batch_tokens,
                prefill_max_wait_s=cfg.prefill_max_wait_s,
                overlap=cfg.overlap_scheduling,
                eos_token_ids=mc.eos_token_ids,
            ),
            decode=_text_decoder(engine.tokenizer),
            sink=self.metrics,
        )
        limit = min(cfg.max_new_tokens_limit or engine.max_context, engine.max_context)
        self.state.limits = validation.Limits(
            vocab_size=mc.vocab_size, max_context=engine.max_context, max_new_tokens_limit=limit,
            max_request_bytes=cfg.max_request_bytes,
        )
        self.state.tokenizer = engine.tokenizer
        self.state.model_info = pb.GetModelInfoResponse(
            model=_model_name(cfg), vocab_size=mc.vocab_size,
            max_context=engine.max_context, max_slots=engine.max_slots,
            eos_token_ids=mc.eos_token_ids, num_layers=mc.num_hidden_layers,
            hidden_size=mc.hidden_size, num_experts=mc.num_experts,
            experts_per_token=mc.experts_per_token, device=cfg.device, dtype=cfg.dtype,
            max_new_tokens_limit=limit, version=VERSION,
        )
        loop = EngineLoop(engine, self.scheduler, asyncio.get_running_loop())
        loop.start()
        self.state.engine_loop = loop

    async def wait_ready(self) -> None:
        await self.ready.wait()
        if self.load_error is not None:
            raise RuntimeError(f"engine failed to load: {self.load_error}") from self.load_error

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop admitting, finish in-flight requests within the grace period, then stop."""
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        self.state.draining = True
        await self.health.set_serving(False)
        loop = asyncio.get_running_loop()
        engine_loop = self.state.engine_loop
        if engine_loop is not None:
            log.info("draining: %d requests in flight, grace %.1fs", engine_loop.num_in_flight,
                     grace_s)
            deadline = loop.time() + grace_s
            while engine_loop.num_in_flight and loop.time() < deadline:
                await asyncio.sleep(0.02)
            if engine_loop.num_in_flight:
                log.warning("grace period over: aborting %d requests", engine_loop.num_in_flight)
                self.scheduler.abort_all()
                deadline = loop.time() + 5.0
                while engine_loop.num_in_flight and loop.time() < deadline:
                    await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving now (in-flight RPCs get `grace_s` to send what they have)."""
        if self.stopped.is_set():
            return
        self.state.draining = True
        await self.server.stop(grace_s)
        if self._load_task is not None:
            await self._load_task
        if self.state.engine_loop is not None:
            await asyncio.to_thread(self.state.engine_loop.stop)
        self.metrics.shutdown()
        self.stopped.set()


async def start_server(config: ServerConfig, engine=None, wait_ready: bool = True) -> ServerHandle:  # noqa: ANN001
    """Bind and start serving; the engine (built from `config` unless given) loads in the back."""
    metrics = Metrics()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.auth_token:  # outermost: refuse before doing anything else
        interceptors.append(AuthInterceptor(config.auth_token, metrics.on_error))
    interceptors.append(ErrorInterceptor(metrics.on_error))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent second server
            ("grpc.max_receive_message_length", 2 * config.max_request_bytes),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    state = ServiceState(metrics=metrics)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(state), server)
    health = Health(server)
    names = [SERVICE_NAME] + ([] if health.builtin else ["grpc.health.v1.Health"])
    enable_reflection(server, names)
    if config.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(config.address, creds)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    await server.start()
    await health.set_serving(False)
    handle = ServerHandle(config, server, port, metrics, health, state)
    if config.metrics_port is not None:
        handle.metrics_port = metrics.serve(config.metrics_port, config.host)
    log.info("listening on %s:%d (metrics port %s, tls %s, auth %s)", config.host, port,
             handle.metrics_port, bool(config.tls_cert), bool(config.auth_token))
    handle._load_task = asyncio.create_task(handle._load(engine))
    if wait_ready:
        await handle.wait_ready()
    return handle


GIL_SWITCH_INTERVAL_S = 0.0005


async def serve(config: ServerConfig, port_file: str | None = None) -> int:
    """The `serve` command: run until SIGTERM/SIGINT, then drain. Returns an exit code."""
    # The engine thread needs the GIL for a moment around every step (staging the batch,
    # launching, reading the tokens back) while the event loop streams hundreds of replies; at
    # the default 5 ms switch interval it waited up to 5 ms per hand-over, and the GPU with it.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    handle = await start_server(config, wait_ready=False)
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(json.dumps({"port": handle.port, "metrics_port": handle.metrics_port}))
        os.replace(tmp, port_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, asyncio.create_task(handle.ready.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if handle.load_error is not None:
        await handle.stop()
        return 1
    await waiter
    log.info("signal received: draining (grace %.1fs)", config.grace_period_s)
    await handle.drain()
    log.info("stopped")
    return 0


class BackgroundServer:
    """A server on its own thread and event loop; `with BackgroundServer(cfg) as s: s.port`."""

    def __init__(self, config: ServerConfig, engine=None, timeout: float = 120.0,  # noqa: ANN001
                 wait_ready: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="server", daemon=True)
        self._thread.start()
        self.handle: ServerHandle = self.call(start_server(config, engine, wait_ready), timeout)

    def call(self, coro, timeout: float | None = 60.0):  # noqa: ANN001, ANN201
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.handle.metrics_port

    def drain(self, grace_s: float | None = None, timeout: float | None = 120.0) -> None:
        self.call(self.handle.drain(grace_s), timeout)
        self._close_loop()

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self.call(self.handle.stop(), 60.0)
        self._close_loop()

    def _close_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
