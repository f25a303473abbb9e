"""Shared fixtures: real gRPC servers on loopback (port 0) over the built-in tiny model.

The tiny model in float32 on the CPU takes a few milliseconds per step, so every test gets its own
fresh server (metrics start from zero, no state leaks between tests).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

SERVER_DEFAULTS = dict(
    port=0, metrics_port=0, dtype="float32", max_slots=8, max_context=256, max_chunk_tokens=64,
    max_step_tokens=128, max_queue=64, grace_period_s=30.0,
)


@pytest.fixture
def make_server() -> Iterator[Callable[..., object]]:
    """make_server(engine=None, **ServerConfig overrides) -> a started BackgroundServer."""
    from service.config import ServerConfig
    from service.server import BackgroundServer

    started: list[BackgroundServer] = []

    def make(engine: object = None, wait_ready: bool = True, **overrides: object) -> BackgroundServer:
        config = replace(ServerConfig(**SERVER_DEFAULTS), **overrides)
        server = BackgroundServer(config, engine=engine, wait_ready=wait_ready)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server):  # noqa: ANN001, ANN201
    return make_server()


@pytest.fixture
def client(server):  # noqa: ANN001, ANN201
    from service.client import GenerationClient

    with GenerationClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def engine_alone():  # noqa: ANN201
    """The runtime by itself (no server), to compare the server's greedy outputs against."""
    from runtime.engine import Engine, EngineConfig

    return Engine(EngineConfig(dtype="float32", max_slots=1, max_context=256, max_chunk_tokens=64))


def scrape(port: int) -> dict[str, float]:
    """GET /metrics → {'name{labels}': value} for every sample."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds; fail (not hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def slow_engine():  # noqa: ANN201
    """slow_engine(delay_s=0.01, max_slots=8) -> a real tiny engine whose steps take at least delay_s."""
    from runtime.engine import Engine, EngineConfig
    from tests.service_fakes import Throttled

    def make(delay_s: float = 0.01, max_slots: int = SERVER_DEFAULTS["max_slots"]) -> Throttled:
        engine = Engine(EngineConfig(dtype="float32", max_slots=max_slots,
                                     max_context=SERVER_DEFAULTS["max_context"],
                                     max_chunk_tokens=SERVER_DEFAULTS["max_chunk_tokens"]))
        return Throttled(engine, delay_s)

    return make


def free_port() -> int:
    """A port nothing listens on right now (for a server that must come back on the same port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_process(tmp_path):  # noqa: ANN001, ANN201
    """serve_process(*serve_args, port=0) -> a `gptoss-serve serve` child process, ready to serve.

    Returns the Popen with `.port`, `.metrics_port` and `.target` set; the built-in tiny model in
    float32 unless the args say otherwise. Every process started is killed at teardown.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    started: list[subprocess.Popen] = []

    def start(*args: str, port: int = 0, timeout: float = 120.0) -> subprocess.Popen:
        port_file = tmp_path / f"ports-{len(started)}.json"
        cmd = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve",
               "--port", str(port), "--metrics-port", "0", "--port-file", str(port_file),
               "--dtype", "float32", "--max-context", "256", *args]
        with open(tmp_path / f"serve-{len(started)}.log", "w") as log:  # the child keeps its copy
            proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                                    stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        wait_for(lambda: port_file.exists() or proc.poll() is not None, timeout, "the port file")
        assert proc.poll() is None, (tmp_path / f"serve-{len(started) - 1}.log").read_text()
        ports = json.loads(port_file.read_text())
        proc.port, proc.metrics_port = ports["port"], ports["metrics_port"]
        proc.target = f"127.0.0.1:{proc.port}"
        from service.client import GenerationClient

        with GenerationClient(proc.target, timeout=10) as c:  # loaded once GetModelInfo answers
            def loaded() -> bool:
                try:
                    return c.model_info().max_slots > 0
                except Exception:  # noqa: BLE001 - UNAVAILABLE while loading
                    return False

            wait_for(loaded, timeout, "the model to load")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
