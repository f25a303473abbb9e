"""The real gRPC server on loopback: every RPC, batching, stops, UTF-8, against the runtime alone."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from proto.gptoss.v1 import generate_pb2 as pb
from runtime.types import GREEDY
from service.client import AsyncGenerationClient, GenerationClient, build_request
from tests.conftest import scrape
from tests.service_fakes import EOS, ByteTokenizer, FakeEngine, Throttled

GREEDY_KW = dict(temperature=0.0, ignore_eos=True)


def alone(engine, prompt_ids, n):  # noqa: ANN001, ANN201
    return list(engine.generate(list(prompt_ids), GREEDY, max_new_tokens=n, ignore_eos=True).token_ids)


def collect(stream) -> tuple[list[int], str, list[pb.GenerateResponse]]:  # noqa: ANN001
    msgs = list(stream)
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs


@pytest.mark.parametrize("prompt", ["Hello, gpt-oss!", [5, 17, 42, 99, 3]])
def test_stream_deltas_concatenate_to_the_unary_result(client, prompt) -> None:  # noqa: ANN001
    unary = client.generate(prompt, max_new_tokens=12, **GREEDY_KW)
    ids, text, msgs = collect(client.stream(prompt, max_new_tokens=12, **GREEDY_KW))
    assert ids == list(unary.token_ids) and len(ids) == 12
    assert text == unary.text
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert msgs[-1].finish_reason == unary.finish_reason == pb.LENGTH
    assert msgs[-1].usage.completion_tokens == unary.usage.completion_tokens == 12
    assert unary.usage.prompt_tokens == (len(prompt) if isinstance(prompt, list) else
                                         len(client.tokenize(prompt)))
    assert all(m.request_id == msgs[0].request_id for m in msgs) and msgs[0].request_id


def test_greedy_output_through_the_server_equals_the_runtime_alone(client, engine_alone) -> None:  # noqa: ANN001
    prompt = client.tokenize("The quick brown fox")
    reply = client.generate("The quick brown fox", max_new_tokens=20, **GREEDY_KW)
    assert list(reply.token_ids) == alone(engine_alone, prompt, 20)
    assert reply.text == engine_alone.tokenizer.decode(list(reply.token_ids),
                                                       skip_special_tokens=True)


def test_32_concurrent_streams_are_batched_and_each_equals_running_alone(
    server, engine_alone  # noqa: ANN001
) -> None:
    jobs = [([(7 * i + j) % 250 for j in range(1 + (i * 5) % 40)], 1 + (i * 7) % 16)
            for i in range(32)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(i: int) -> None:
        try:
            with GenerationClient(server.target, timeout=120) as c:
                barrier.wait()
                results[i] = collect(c.stream(jobs[i][0], max_new_tokens=jobs[i][1],
                                              **GREEDY_KW))[0]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i, (prompt, n) in enumerate(jobs):
        assert results[i] == alone(engine_alone, prompt, n), f"stream {i}"
    m = scrape(server.metrics_port)
    single = m['gptoss_batch_size_bucket{le="1.0"}']
    assert m["gptoss_batch_size_count"] > single, "no step ever ran more than one sequence"
    assert m["gptoss_slots_used"] == 0


def test_stop_string_spanning_token_boundaries(client) -> None:  # noqa: ANN001
    full = client.generate([1, 2, 3], max_new_tokens=60, **GREEDY_KW)
    text = full.text
    # Two adjacent whole characters from the middle of the output, each from its own token.
    i = next(i for i in range(4, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stop = text[i:i + 2]
    reply = client.generate([1, 2, 3], max_new_tokens=60, stop=[stop], **GREEDY_KW)
    assert reply.finish_reason == pb.STOP_SEQUENCE
    assert reply.text == text[: text.find(stop)]
    ids, streamed, msgs = collect(client.stream([1, 2, 3], max_new_tokens=60, stop=[stop],
                                                **GREEDY_KW))
    assert streamed == reply.text and msgs[-1].finish_reason == pb.STOP_SEQUENCE
    assert ids == list(reply.token_ids)


def test_stop_token_ids_and_max_new_tokens(client) -> None:  # noqa: ANN001
    free = client.generate([9, 8, 7], max_new_tokens=30, **GREEDY_KW)
    stop_id = free.token_ids[5]
    first = list(free.token_ids).index(stop_id)
    reply = client.generate([9, 8, 7], max_new_tokens=30, stop_token_ids=[stop_id], **GREEDY_KW)
    assert reply.finish_reason == pb.STOP
    assert list(reply.token_ids) == list(free.token_ids)[: first + 1]
    short = client.generate([9, 8, 7], max_new_tokens=4, **GREEDY_KW)
    assert short.finish_reason == pb.LENGTH and len(short.token_ids) == 4


def test_model_eos_stops_unless_ignore_eos(client) -> None:  # noqa: ANN001
    eos = client.model_info().eos_token_ids[0]
    # Find a prompt whose greedy continuation reaches EOS within the limit.
    for seed_token in range(40):
        free = client.generate([seed_token], max_new_tokens=120, **GREEDY_KW)
        if eos in free.token_ids:
            break
    else:
        pytest.fail("the tiny model never produced EOS in 40 prompts")
    stopped = client.generate([seed_token], max_new_tokens=120, temperature=0.0)
    cut = list(free.token_ids).index(eos) + 1
    assert stopped.finish_reason == pb.STOP
    assert list(stopped.token_ids) == list(free.token_ids)[:cut]
    assert "<|" not in stopped.text  # the EOS token is not part of the text


def test_multibyte_utf8_is_never_split_across_messages(make_server) -> None:  # noqa: ANN001
    text = "héllo → 数字 😀 ok"
    # 20 ms steps: the reader keeps up, so each step is its own message (a reader that falls
    # behind gets the ready steps merged into one, tests/test_service_coalesce.py)
    engine = Throttled(FakeEngine(script=ByteTokenizer().encode(text)), delay_s=0.02)
    server = make_server(engine=engine)
    with GenerationClient(server.target, timeout=30) as c:
        ids, streamed, msgs = collect(c.stream([65], max_new_tokens=64))
    assert streamed == text and ids[-1] == EOS
    assert msgs[-1].finish_reason == pb.STOP
    for m in msgs:
        assert "\ufffd" not in m.text
    assert any(m.text == "😀" for m in msgs) and any(not m.text for m in msgs)


def test_utf8_of_the_real_model_round_trips(client, engine_alone) -> None:  # noqa: ANN001
    ids, streamed, _ = collect(client.stream([200, 201], max_new_tokens=80, **GREEDY_KW))
    assert streamed == engine_alone.tokenizer.decode(ids, skip_special_tokens=True)


def test_logprobs_are_returned_when_asked(client) -> None:  # noqa: ANN001
    reply = client.generate([4, 5], max_new_tokens=3, top_logprobs=2, **GREEDY_KW)
    assert len(reply.logprobs) == 3
    for lp, tok in zip(reply.logprobs, reply.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token_id == tok  # greedy
    assert not client.generate([4, 5], max_new_tokens=2, **GREEDY_KW).logprobs


def test_seeded_sampling_is_reproducible(client) -> None:  # noqa: ANN001
    a = client.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    b = client.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    assert list(a.token_ids) == list(b.token_ids)


def test_tokenize_and_model_info(client, engine_alone) -> None:  # noqa: ANN001
    assert client.tokenize("héllo") == engine_alone.tokenizer.encode("héllo")
    info = client.model_info()
    assert info.vocab_size == engine_alone.model_config.vocab_size
    assert (info.max_context, info.max_slots, info.model) == (256, 8, "tiny-random")


def test_async_client_streams(server) -> None:  # noqa: ANN001
    async def main() -> tuple[list[int], list[int]]:
        async with AsyncGenerationClient(server.target, timeout=30) as c:
            streamed = [t async for m in c.stream([3, 1, 4], max_new_tokens=6, **GREEDY_KW)
                        for t in m.token_ids]
            unary = await c.generate(build_request(token_ids=[3, 1, 4], max_new_tokens=6,
                                                   **GREEDY_KW))
            return streamed, list(unary.token_ids)

    streamed, unary = asyncio.run(main())
    assert streamed == unary and len(unary) == 6


def test_a_client_from_the_proto_alone_can_stream(server) -> None:  # noqa: ANN001
    """No helper code: a raw channel and the generated stub, as any language would do."""
    from proto.gptoss.v1 import generate_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        req = pb.GenerateRequest(text="hi", stopping=pb.StoppingCriteria(max_new_tokens=3,
                                                                         ignore_eos=True))
        msgs = list(stub.StreamGenerate(req, timeout=30))
    assert sum(len(m.token_ids) for m in msgs) == 3 and msgs[-1].finish_reason == pb.LENGTH


def test_prefix_reuse_through_the_server_keeps_outputs_exact(client, engine_alone) -> None:  # noqa: ANN001
    prompt = list(range(50, 90))
    first = client.generate(prompt, max_new_tokens=8, **GREEDY_KW)
    follow = prompt + list(first.token_ids[:5]) + [7, 8]
    reply = client.generate(follow, max_new_tokens=10, **GREEDY_KW)
    assert reply.usage.cached_prompt_tokens == len(prompt) + 5
    assert list(reply.token_ids) == alone(engine_alone, follow, 10)


def test_a_vanishing_temperature_is_greedy(client) -> None:  # noqa: ANN001
    greedy = client.generate([6, 6], max_new_tokens=8, **GREEDY_KW)
    tiny = client.generate([6, 6], max_new_tokens=8, ignore_eos=True, temperature=1e-30, seed=3)
    assert list(tiny.token_ids) == list(greedy.token_ids)
