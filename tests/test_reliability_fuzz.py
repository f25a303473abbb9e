"""Property-based fuzz of the API: any GenerateRequest (and any bytes at all) gets OK or a
documented status with a message — never UNKNOWN or INTERNAL — and the server stays healthy.

Requests are built field by field with edge values (NaN, ±inf, huge ids, empty and oversized lists,
non-printable ids). Where DESIGN §7 says a request is bad, the answer must be INVALID_ARGUMENT;
where it succeeds, the reply must be consistent with what was asked.
"""

from __future__ import annotations

import math
from dataclasses import replace

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc
from tests.conftest import SERVER_DEFAULTS, scrape, wait_for

VOCAB = 259  # the built-in tiny model
CONTEXT = 64  # small, so requests without max_new_tokens end quickly
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS"}
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, 2**32 - 1)
small_or_any = st.one_of(st.integers(0, 12), st.sampled_from([CONTEXT - 1, CONTEXT, 2**31]), u32)
any_token = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([VOCAB - 1, VOCAB, 2**32 - 1]))
any_float = st.one_of(
    st.floats(width=32),  # NaN and ±inf included
    st.sampled_from([0.0, -0.0, 1e-6, 0.5, 1.0, 2.0, -2.0, 2.5, 0.01, 100.0, 1e30]),
)
token = st.integers(0, VOCAB - 1)


def f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    """float32 values in [lo, hi] (the wire type), bounds rounded inwards."""
    import numpy as np

    lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))
    lo32 = lo32 if lo32 >= lo else float(np.nextafter(np.float32(lo), np.float32(hi)))
    hi32 = hi32 if hi32 <= hi else float(np.nextafter(np.float32(hi), np.float32(lo)))
    return st.floats(lo32, hi32, width=32)


# field: (a sensible value, anything the wire type can carry)
FIELDS = {
    "prompt_ids": (st.lists(token, min_size=1, max_size=20),
                   st.lists(any_token, max_size=CONTEXT + 2)),
    "prompt_text": (st.text(min_size=1, max_size=20), st.text(max_size=40)),
    "request_id": (st.one_of(st.just(""), st.text(st.characters(min_codepoint=33,
                                                                  max_codepoint=126),
                                                  max_size=12)),
                   st.text(max_size=140)),
    "temperature": (f32(0, 2), any_float),
    "top_p": (f32(0.01, 1), any_float),
    "min_p": (f32(0, 1), any_float),
    "presence_penalty": (f32(-2, 2), any_float),
    "frequency_penalty": (f32(-2, 2), any_float),
    "repetition_penalty": (f32(0.5, 2), any_float),
    "top_k": (st.integers(0, VOCAB), small_or_any),
    "seed": (st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    "max_new_tokens": (st.integers(4, 10), small_or_any),
    "min_new_tokens": (st.integers(0, 3), small_or_any),
    "stop": (st.lists(st.text(min_size=1, max_size=3), max_size=3),
             st.lists(st.text(max_size=4), max_size=3)
             | st.lists(st.text(min_size=1, max_size=2), min_size=17, max_size=18)),
    "stop_token_ids": (st.lists(token, max_size=3), st.lists(any_token, max_size=3)),
    "logprobs": (st.integers(0, 20), st.one_of(st.integers(0, 21), u32)),
    "top_logprobs": (st.integers(0, 20), st.one_of(st.integers(0, 21), u32)),
}
SAMPLING = FLOAT_FIELDS + ("top_k", "seed")


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A third sensible requests, a third with one field wild, a third wild throughout."""
    mode = draw(st.sampled_from(["sensible", "one_wild", "wild"]))
    wild_one = draw(st.sampled_from(sorted(FIELDS)))

    def value(name: str):  # noqa: ANN202
        wild = mode == "wild" or (mode == "one_wild" and name == wild_one)
        return draw(FIELDS[name][1 if wild else 0])

    def maybe(name: str) -> bool:  # optional fields: set about half the time
        return (mode == "one_wild" and name == wild_one) or draw(st.booleans())

    req = pb.GenerateRequest(request_id=value("request_id"))
    kind = draw(st.sampled_from(["ids", "ids", "text"] + (["none"] if mode == "wild" else [])))
    if kind == "ids":
        req.token_ids.token_ids.extend(value("prompt_ids"))
    elif kind == "text":
        req.text = value("prompt_text")
    for name in SAMPLING:
        if maybe(name):
            setattr(req.sampling, name, value(name))
    stop = req.stopping
    if mode != "sensible" or draw(st.booleans()):  # unset: until the context is full
        stop.max_new_tokens = value("max_new_tokens")
    if maybe("min_new_tokens"):
        stop.min_new_tokens = value("min_new_tokens")
    if stop.HasField("max_new_tokens") and mode == "sensible":
        stop.min_new_tokens = min(stop.min_new_tokens, stop.max_new_tokens)
    stop.stop.extend(value("stop"))
    stop.stop_token_ids.extend(value("stop_token_ids"))
    stop.ignore_eos = draw(st.booleans())
    for name in ("logprobs", "top_logprobs"):
        if maybe(name):
            setattr(req, name, value(name))
    return req


def must_refuse(req: pb.GenerateRequest) -> bool:
    """Requests DESIGN §7 calls bad input, whatever else they hold."""
    kind = req.WhichOneof("prompt")
    ids = list(req.token_ids.token_ids) if kind == "token_ids" else None
    st_ = req.stopping
    return (
        kind is None or (kind == "text" and not req.text) or (ids is not None and (
            not ids or max(ids) >= VOCAB or len(ids) >= CONTEXT
            or (st_.HasField("max_new_tokens") and len(ids) + st_.max_new_tokens > CONTEXT)))
        or (st_.HasField("max_new_tokens") and st_.max_new_tokens == 0)
        or any(req.sampling.HasField(f) and not math.isfinite(getattr(req.sampling, f))
               for f in FLOAT_FIELDS)
        or any(t >= VOCAB for t in st_.stop_token_ids) or len(st_.stop) > 16
        or any(not s for s in st_.stop)
    )


def check_reply(req: pb.GenerateRequest, tokens: list[int], last: pb.GenerateResponse) -> None:
    assert last.finish_reason in (pb.LENGTH, pb.STOP, pb.STOP_SEQUENCE), last
    assert last.usage.completion_tokens == len(tokens)
    assert all(t < VOCAB for t in tokens)
    if req.stopping.HasField("max_new_tokens"):
        assert len(tokens) <= req.stopping.max_new_tokens
    if last.finish_reason == pb.STOP:
        assert tokens[-1] in (*req.stopping.stop_token_ids, *((257,) if not
                                                             req.stopping.ignore_eos else ()))


@pytest.fixture(scope="module")
def fuzz_server():  # noqa: ANN201
    from service.config import ServerConfig
    from service.server import BackgroundServer

    config = replace(ServerConfig(**SERVER_DEFAULTS), max_context=CONTEXT, max_chunk_tokens=16)
    server = BackgroundServer(config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server):  # noqa: ANN001, ANN201
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield ch


def status(call) -> tuple[str, object]:  # noqa: ANN001
    try:
        return "OK", call()
    except grpc.RpcError as exc:
        assert exc.details(), f"{exc.code().name} without a message"
        return exc.code().name, exc


@SETTINGS
@given(req=requests(), stream=st.booleans())
def test_any_generate_request_gets_ok_or_a_documented_status(channel, req, stream) -> None:  # noqa: ANN001
    stub = pb_grpc.GenerationStub(channel)
    if stream:
        code, got = status(lambda: list(stub.StreamGenerate(req, timeout=60)))
        if code == "OK":
            got = (sum((list(m.token_ids) for m in got), []), got[-1])
    else:
        code, got = status(lambda: stub.Generate(req, timeout=60))
        if code == "OK":
            got = (list(got.token_ids), got)
    event(code)
    assert code in DOCUMENTED, (code, got, req)
    if must_refuse(req):
        assert code == "INVALID_ARGUMENT", (code, req)
    if code == "OK":
        check_reply(req, *got)


@SETTINGS
@given(method=st.sampled_from(["Generate", "StreamGenerate", "Abort", "Tokenize",
                               "GetModelInfo"]), payload=st.binary(max_size=48))
def test_arbitrary_bytes_never_get_unknown_or_internal(channel, method, payload) -> None:  # noqa: ANN001
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    path = f"/gptoss.v1.Generation/{method}"
    if method == "StreamGenerate":
        call = channel.unary_stream(path, **ident)
        code, _ = status(lambda: list(call(payload, timeout=60)))
    else:
        call = channel.unary_unary(path, **ident)
        code, _ = status(lambda: call(payload, timeout=60))
    assert code in DOCUMENTED, (code, method, payload)


def test_a_corrupt_message_is_invalid_argument(channel) -> None:  # noqa: ANN001
    call = channel.unary_unary("/gptoss.v1.Generation/Generate",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x05ab", timeout=30)  # field 1 claims 5 bytes, 2 follow
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in err.value.details()


def test_server_is_healthy_and_idle_after_the_fuzz(fuzz_server, channel) -> None:  # noqa: ANN001
    """Runs after the fuzz tests above (file order): nothing stuck, still serving correctly."""
    from service.health import SERVING, _builtin_messages

    h = fuzz_server.handle
    wait_for(lambda: h.scheduler.num_live == 0 and h.state.engine_loop.num_in_flight == 0
             and h.scheduler.slots.num_used == 0, what="the server to go idle")
    request, response = _builtin_messages()  # the grpc.health.v1 wire format
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=request.SerializeToString,
                                response_deserializer=response.FromString)
    assert check(request(service="gptoss.v1.Generation"), timeout=10).status == SERVING
    stub = pb_grpc.GenerationStub(channel)
    req = pb.GenerateRequest(token_ids=pb.TokenIds(token_ids=[1, 2, 3]))
    req.stopping.max_new_tokens, req.stopping.ignore_eos = 5, True
    assert len(stub.Generate(req, timeout=30).token_ids) == 5
    m = scrape(fuzz_server.metrics_port)
    assert m['gptoss_request_errors_total{code="INTERNAL"}'] == 0
    assert m["gptoss_slots_used"] == 0 and m["gptoss_num_requests_waiting"] == 0
