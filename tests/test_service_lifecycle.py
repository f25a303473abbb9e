"""Health, reflection, loading, draining (in process and on SIGTERM), auth and TLS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.gptoss.v1 import generate_pb2 as pb
from service.client import GenerationClient
from tests.conftest import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parent.parent


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_serves_overall_and_the_generation_service(client) -> None:  # noqa: ANN001
    assert health(client.channel) == SERVING
    assert health(client.channel, "gptoss.v1.Generation") == SERVING


def test_reflection_lists_the_generation_service(server) -> None:  # noqa: ANN001
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"gptoss.v1.Generation", "grpc.health.v1.Health"} <= services
        file = db.FindFileContainingSymbol("gptoss.v1.Generation")
        assert [s.name for s in file.service] == ["Generation"]
        assert {m.name for m in file.service[0].method} == {
            "Generate", "StreamGenerate", "Abort", "Tokenize", "GetModelInfo"}


def test_builtin_health_speaks_the_standard_protocol() -> None:
    """Where grpcio-health-checking is not installed, probes still get grpc.health.v1 answers."""
    import asyncio

    from service.health import Health

    async def main() -> tuple[int, int, int]:
        server = grpc.aio.server()
        h = Health(server, force_builtin=True)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await h.set_serving(False)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            before = (await stub.Check(health_pb2.HealthCheckRequest())).status
            await h.set_serving(True)
            after = (await stub.Check(
                health_pb2.HealthCheckRequest(service="gptoss.v1.Generation"))).status
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            first = (await watch.read()).status
            watch.cancel()
        await server.stop(0)
        return before, after, first

    assert asyncio.run(main()) == (NOT_SERVING, SERVING, SERVING)


def test_not_serving_while_the_model_loads(make_server, monkeypatch) -> None:  # noqa: ANN001
    import service.server as server_mod

    release = threading.Event()
    real_build = server_mod.build_engine

    def slow_build(config):  # noqa: ANN001, ANN202
        release.wait(60)
        return real_build(config)

    monkeypatch.setattr(server_mod, "build_engine", slow_build)
    server = make_server(wait_ready=False)
    try:
        with GenerationClient(server.target, timeout=30) as c:
            assert health(c.channel) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1], max_new_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in err.value.details()
            release.set()
            wait_for(lambda: health(c.channel) == SERVING, what="SERVING")
            assert len(c.generate([1], max_new_tokens=2, ignore_eos=True).token_ids) == 2
    finally:
        release.set()


def test_drain_finishes_in_flight_streams_and_refuses_new_ones(make_server, slow_engine) -> None:  # noqa: ANN001
    server = make_server(engine=slow_engine(0.005))
    with GenerationClient(server.target, timeout=60) as c:
        stream = c.stream([1, 2], max_new_tokens=120, temperature=0.0, ignore_eos=True)
        first = next(stream)
        drained = threading.Thread(target=server.drain, kwargs={"grace_s": 60})
        drained.start()
        wait_for(lambda: health(c.channel) == NOT_SERVING, what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            c.generate([1], max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert rest[-1].finish_reason == pb.LENGTH
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 120
        drained.join(60)
        assert not drained.is_alive()


def test_drain_aborts_what_is_left_after_the_grace_period(make_server, slow_engine) -> None:  # noqa: ANN001
    server = make_server(engine=slow_engine(0.01))
    with GenerationClient(server.target, timeout=60) as c:
        stream = c.stream([1, 2], max_new_tokens=240, temperature=0.0, ignore_eos=True)
        next(stream)
        server.drain(grace_s=0.1)
        assert list(stream)[-1].finish_reason == pb.ABORTED


def test_sigterm_drains_a_real_serve_process(tmp_path) -> None:  # noqa: ANN001
    port_file = tmp_path / "ports.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--metrics-port", "0",
         "--port-file", str(port_file), "--dtype", "float32", "--max-context", "512",
         "--max-slots", "2", "--grace-period", "120"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 120, "the port file")
        assert proc.poll() is None, proc.communicate()[0]
        target = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        with GenerationClient(target, timeout=120) as c:
            wait_for(lambda: health(c.channel) == SERVING, 120, "SERVING")
            stream = c.stream([5, 6], max_new_tokens=400, temperature=0.0, ignore_eos=True)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health(c.channel) == NOT_SERVING, 60, "NOT_SERVING")
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1], max_new_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
        assert rest[-1].finish_reason == pb.LENGTH
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 400
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bearer_token_is_required_except_for_health(make_server) -> None:  # noqa: ANN001
    server = make_server(auth_token="s3cret")
    with GenerationClient(server.target, timeout=30) as anon:
        for call in (lambda: anon.generate([1], max_new_tokens=1),
                     lambda: list(anon.stream([1], max_new_tokens=1)),
                     lambda: anon.model_info()):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health(anon.channel) == SERVING
    with GenerationClient(server.target, token="wrong", timeout=30) as bad, \
            pytest.raises(grpc.RpcError) as err:
        bad.generate([1], max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with GenerationClient(server.target, token="s3cret", timeout=30) as good:
        assert len(good.generate([1], max_new_tokens=2, ignore_eos=True).token_ids) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_serves_only_tls_clients(make_server, tmp_path) -> None:  # noqa: ANN001
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    with GenerationClient(server.target, tls_ca=str(cert), timeout=30) as c:
        assert len(c.generate([1], max_new_tokens=2, ignore_eos=True).token_ids) == 2
    with GenerationClient(server.target, timeout=5) as plain, \
            pytest.raises(grpc.RpcError) as err:
        plain.generate([1], max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
