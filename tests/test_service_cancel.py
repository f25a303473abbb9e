"""Client cancel, deadlines and the Abort RPC free the slot at the next step; others carry on."""

from __future__ import annotations

import grpc
import pytest

from proto.gptoss.v1 import generate_pb2 as pb
from runtime.types import GREEDY
from service.client import GenerationClient
from tests.conftest import scrape, wait_for

LONG = dict(max_new_tokens=240, temperature=0.0, ignore_eos=True)


def idle(server) -> bool:  # noqa: ANN001
    m = scrape(server.metrics_port)
    return m["gptoss_slots_used"] == 0 and m["gptoss_num_requests_running"] == 0


@pytest.fixture
def slow_server(make_server, slow_engine):  # noqa: ANN001, ANN201
    return make_server(engine=slow_engine(0.01))


def test_client_cancel_mid_stream_frees_the_slot_and_others_carry_on(
    slow_server, engine_alone  # noqa: ANN001
) -> None:
    with GenerationClient(slow_server.target, timeout=60) as c:
        doomed = c.stream([1, 2, 3], **LONG)
        survivor = c.stream([4, 5, 6], max_new_tokens=30, temperature=0.0, ignore_eos=True)
        next(doomed), next(doomed)
        doomed.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(doomed)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        ids = [t for m in survivor for t in m.token_ids]
    expected = engine_alone.generate([4, 5, 6], GREEDY, max_new_tokens=30, ignore_eos=True)
    assert ids == list(expected.token_ids)
    wait_for(lambda: idle(slow_server), what="slots to be freed")
    m = scrape(slow_server.metrics_port)
    assert m['gptoss_requests_total{finish_reason="aborted"}'] == 1
    assert m['gptoss_requests_total{finish_reason="length"}'] == 1
    assert m['gptoss_request_errors_total{code="CANCELLED"}'] == 1


def test_deadline_exceeded_aborts_the_request(slow_server) -> None:  # noqa: ANN001
    with GenerationClient(slow_server.target, timeout=0.3) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.generate([1, 2, 3], **LONG)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: idle(slow_server), what="slots to be freed")
    m = scrape(slow_server.metrics_port)
    assert m['gptoss_requests_total{finish_reason="aborted"}'] == 1
    assert m['gptoss_request_errors_total{code="DEADLINE_EXCEEDED"}'] == 1
    assert m['gptoss_request_errors_total{code="CANCELLED"}'] == 0


def test_abort_rpc_ends_the_stream_with_aborted(slow_server) -> None:  # noqa: ANN001
    with GenerationClient(slow_server.target, timeout=60) as c:
        stream = c.stream([1, 2, 3], request_id="job-1", **LONG)
        other = c.stream([7, 7], max_new_tokens=20, temperature=0.0, ignore_eos=True)
        first = next(stream)
        assert first.request_id == "job-1"
        assert c.abort("job-1") is True
        rest = list(stream)
        assert rest[-1].finish_reason == pb.ABORTED
        got = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
        assert rest[-1].usage.completion_tokens == got < 240
        assert c.abort("job-1") is False  # already finished
        assert c.abort("never-existed") is False
        other_msgs = list(other)
        assert other_msgs[-1].finish_reason == pb.LENGTH
        assert sum(len(m.token_ids) for m in other_msgs) == 20
    wait_for(lambda: idle(slow_server), what="slots to be freed")
