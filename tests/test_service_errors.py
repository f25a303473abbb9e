"""Bad input, full queues, duplicates and internal failures map to clear gRPC status codes."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.gptoss.v1 import generate_pb2 as pb
from service.client import GenerationClient, build_request
from tests.conftest import scrape, wait_for
from tests.service_fakes import FakeEngine


def req(**kw) -> pb.GenerateRequest:  # noqa: ANN003
    kw.setdefault("token_ids", [1, 2, 3])
    kw.setdefault("max_new_tokens", 4)
    return build_request(**kw)


BAD = {
    "empty text": (build_request(prompt=""), "empty"),
    "empty token ids": (req(token_ids=[]), "empty"),
    "no prompt": (pb.GenerateRequest(), "prompt is missing"),
    "token id >= vocab": (req(token_ids=[1, 259]), "out of range"),
    "prompt + max_new_tokens over context": (req(token_ids=[1] * 200, max_new_tokens=100),
                                             "exceeds the context"),
    "prompt fills the context": (req(token_ids=[1] * 256, max_new_tokens=None), "context"),
    "temperature < 0": (req(temperature=-0.5), "temperature"),
    "temperature nan": (req(temperature=math.nan), "temperature"),
    "temperature inf": (req(temperature=math.inf), "temperature"),
    "top_p 0": (req(top_p=0.0), "top_p"),
    "top_p > 1": (req(top_p=1.5), "top_p"),
    "top_k > vocab": (req(top_k=100000), "top_k"),
    "min_p > 1": (req(min_p=1.5), "min_p"),
    "presence_penalty 3": (req(presence_penalty=3.0), "presence_penalty"),
    "repetition_penalty 0": (req(repetition_penalty=0.0), "repetition_penalty"),
    "repetition_penalty huge": (req(repetition_penalty=1e30), "repetition_penalty"),
    "max_new_tokens 0": (req(max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens over limit": (req(max_new_tokens=10_000), "max_new_tokens"),
    "min over max": (req(max_new_tokens=2, min_new_tokens=5), "min_new_tokens"),
    "empty stop string": (req(stop=[""]), "stop"),
    "too many stop strings": (req(stop=[str(i) for i in range(20)]), "stop"),
    "stop token id >= vocab": (req(stop_token_ids=[5000]), "stop_token_ids"),
    "too many logprobs": (req(top_logprobs=50), "logprobs"),
    "oversize message": (build_request(prompt="x" * (5 << 20), max_new_tokens=1), "bytes"),
}


@pytest.fixture(scope="module")
def shared_server():  # noqa: ANN201
    from dataclasses import replace

    from service.config import ServerConfig
    from service.server import BackgroundServer
    from tests.conftest import SERVER_DEFAULTS

    with BackgroundServer(replace(ServerConfig(**SERVER_DEFAULTS))) as server:
        yield server


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_and_the_server_stays_healthy(shared_server, case) -> None:  # noqa: ANN001
    bad, words = BAD[case]
    server = shared_server
    key = 'gptoss_request_errors_total{code="INVALID_ARGUMENT"}'
    before = scrape(server.metrics_port).get(key, 0)
    with GenerationClient(server.target, timeout=30) as c:
        for call in (c.generate, lambda r: list(c.stream(r))):
            with pytest.raises(grpc.RpcError) as err:
                call(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()
        health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert len(c.generate([1, 2], max_new_tokens=2, ignore_eos=True).token_ids) == 2
    assert scrape(server.metrics_port)[key] == before + 2


def test_queue_full_is_resource_exhausted(make_server, slow_engine) -> None:  # noqa: ANN001
    server = make_server(engine=slow_engine(0.01, max_slots=1), max_slots=1, max_queue=1)
    long = dict(max_new_tokens=240, temperature=0.0, ignore_eos=True)
    with GenerationClient(server.target, timeout=60) as c:
        running = c.stream([1], **long)
        next(running)  # it holds the only slot now
        queued = c.stub.Generate.future(req(max_new_tokens=3, ignore_eos=True), timeout=60)
        wait_for(lambda: scrape(server.metrics_port)["gptoss_num_requests_waiting"] == 1,
                 what="the second request to wait")
        with pytest.raises(grpc.RpcError) as err:
            c.generate(req())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.value.details()
        running.cancel()
        assert len(queued.result().token_ids) == 3


def test_duplicate_request_id_in_flight_is_already_exists(make_server, slow_engine) -> None:  # noqa: ANN001
    server = make_server(engine=slow_engine(0.01))
    with GenerationClient(server.target, timeout=60) as c:
        first = c.stream([1], request_id="same", max_new_tokens=200, ignore_eos=True)
        next(first)
        with pytest.raises(grpc.RpcError) as err:
            c.generate(req(request_id="same"))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        first.cancel()


def test_unexpected_exception_is_internal_never_unknown(server) -> None:  # noqa: ANN001
    class Broken:
        def encode(self, text: str) -> list[int]:
            raise ZeroDivisionError("boom")

    server.handle.state.tokenizer = Broken()
    with GenerationClient(server.target, timeout=30) as c:
        for call in (lambda: c.tokenize("hi"), lambda: c.generate("hi", max_new_tokens=2),
                     lambda: list(c.stream("hi", max_new_tokens=2))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "error id" in err.value.details() and "boom" not in err.value.details()
    assert scrape(server.metrics_port)['gptoss_request_errors_total{code="INTERNAL"}'] == 3


def test_engine_failure_is_internal_and_the_slot_is_freed(make_server) -> None:  # noqa: ANN001
    engine = FakeEngine(max_slots=2, max_context=128)
    server = make_server(engine=engine)
    with GenerationClient(server.target, timeout=30) as c:
        engine.fail_next = True
        with pytest.raises(grpc.RpcError) as err:
            c.generate([1, 2], max_new_tokens=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "injected engine failure" in err.value.details()
        wait_for(lambda: scrape(server.metrics_port)["gptoss_slots_used"] == 0)
        assert len(c.generate([1, 2], max_new_tokens=5, ignore_eos=True).token_ids) == 5
