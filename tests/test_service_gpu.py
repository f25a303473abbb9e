"""The service on a CUDA engine (graphs on): `pytest -m gpu tests/test_service_gpu.py`."""

from __future__ import annotations

import threading

import pytest

from service.client import GenerationClient
from service.health import SERVING, _builtin_messages
from tests.conftest import scrape

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_server(make_server):  # noqa: ANN001, ANN201
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # float32: a batch of 16 runs other MoE kernels (tensor-core tiles) than one request (GEMV);
    # in bf16 their rounding differs and flips near-tied router choices of the random tiny model,
    # so only fp32 can show that batching itself changes nothing.
    return make_server(device="cuda", dtype="float32", max_slots=16, max_context=512,
                       max_chunk_tokens=128, max_step_tokens=256)


def test_cuda_server_batches_with_graphs_and_matches_single_requests(cuda_server) -> None:  # noqa: ANN001
    request, response = _builtin_messages()  # same wire format as grpc_health (may be absent)
    kw = dict(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    with GenerationClient(cuda_server.target, timeout=120) as c:
        check = c.channel.unary_unary("/grpc.health.v1.Health/Check",
                                      request_serializer=request.SerializeToString,
                                      response_deserializer=response.FromString)
        assert check(request(service="gptoss.v1.Generation")).status == SERVING
        single = list(c.generate([1, 2, 3], **kw).token_ids)
        streamed = [t for m in c.stream([1, 2, 3], **kw) for t in m.token_ids]
        assert streamed == single
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        with GenerationClient(cuda_server.target, timeout=120) as cc:
            results[i] = list(cc.generate([1, 2, 3], **kw).token_ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = sum(v == single for v in results.values())
    assert same == 16, f"{same}/16 batched outputs equal the single request's"
    m = scrape(cuda_server.metrics_port)
    assert m["gptoss_cuda_graph_replays_total"] > 0
    assert m["gptoss_batch_size_sum"] > m["gptoss_batch_size_count"]
