"""A stream that falls behind gets what is ready in one message: nothing lost, nothing reordered."""

from __future__ import annotations

import asyncio

from scheduler.request import FinishReason, RequestOutput
from service.servicer import GenerationServicer, ServiceState


class _Context:
    def time_remaining(self) -> float:
        return 60.0


def test_outputs_already_queued_are_merged_in_order_up_to_the_finish() -> None:
    async def collect() -> list[RequestOutput]:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        for out in (RequestOutput("r", (1,), "a"), RequestOutput("r", (2, 3), "bc"),
                    RequestOutput("r", (4,), "d", finish_reason=FinishReason.LENGTH,
                                  prompt_tokens=5, completion_tokens=4)):
            queue.put_nowait(out)
        servicer = GenerationServicer(ServiceState())
        return [o async for o in servicer._outputs("r", queue, _Context())]

    got = asyncio.run(collect())
    assert len(got) == 1
    assert got[0].token_ids == (1, 2, 3, 4) and got[0].text == "abcd"
    assert got[0].finish_reason is FinishReason.LENGTH and got[0].completion_tokens == 4


def test_a_reader_that_keeps_up_gets_one_message_per_step() -> None:
    async def collect() -> list[tuple[int, ...]]:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        servicer = GenerationServicer(ServiceState())
        seen: list[tuple[int, ...]] = []

        async def produce() -> None:
            for i in range(3):
                queue.put_nowait(RequestOutput("r", (i,), str(i),
                                               finish_reason=FinishReason.LENGTH if i == 2
                                               else None))
                await asyncio.sleep(0.01)  # the reader is waiting before the next arrives

        task = asyncio.create_task(produce())
        async for out in servicer._outputs("r", queue, _Context()):
            seen.append(out.token_ids)
        await task
        return seen

    assert asyncio.run(collect()) == [(0,), (1,), (2,)]


def test_tokens_before_an_error_are_sent_before_the_error() -> None:
    class Aborted(Exception):
        pass

    class Context(_Context):
        async def abort(self, code, message) -> None:  # noqa: ANN001
            raise Aborted(code)

    async def collect() -> tuple[list[tuple[int, ...]], bool]:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        for out in (RequestOutput("r", (1,), "a"), RequestOutput("r", (2,), "b"),
                    RequestOutput("r", finish_reason=FinishReason.ERROR, error="boom")):
            queue.put_nowait(out)
        seen: list[tuple[int, ...]] = []
        try:
            async for out in GenerationServicer(ServiceState())._outputs("r", queue, Context()):
                seen.append(out.token_ids)
        except Aborted:
            return seen, True
        return seen, False

    seen, aborted = asyncio.run(collect())
    assert seen == [(1, 2)] and aborted  # the ready tokens in one message, then the error
