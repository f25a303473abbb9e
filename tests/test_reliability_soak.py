"""Soak: ~2000 short requests, a third of them cancelled, aborted or given deadlines too short to
finish. Afterwards nothing is left behind (no live request, slot, queue entry, stream queue or
detokenizer; bounded memory), and every request's tokens equal what the same request produces
alone: the whole output when it finished, a prefix of it when it was cut short.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from proto.gptoss.v1 import generate_pb2 as pb
from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc
from runtime.types import SamplingParams
from service.client import build_request
from tests.conftest import scrape, wait_for

N_REQUESTS = 2000
CONCURRENCY = 32
MAX_NEW = 6
SEED = 20240611
# Values exact in float32 (the wire type), so the solo run samples with the very same parameters.
SAMPLINGS = (
    dict(temperature=0.0),
    dict(temperature=0.75, top_k=20, seed=11),
    dict(temperature=1.0, top_p=0.875, seed=5),
    dict(temperature=0.5, min_p=0.125, seed=7, repetition_penalty=1.25),
)
KINDS = ("complete",) * 10 + ("unary",) * 2 + ("cancel",) * 3 + ("deadline",) * 3 + ("abort",) * 2


@dataclass
class Outcome:
    kind: str
    key: tuple[int, int, bool]  # (prompt, sampling, ignore_eos)
    max_new: int
    tokens: list[int] = field(default_factory=list)
    finish: int = 0
    usage_tokens: int | None = None
    code: str = "OK"


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_prompts(rng: random.Random) -> list[tuple[int, ...]]:
    """Prompts sharing prefixes of a few bases, so freed rows are reused for their prefix."""
    bases = [[rng.randrange(256) for _ in range(24)] for _ in range(3)]
    prompts = []
    for i in range(16):
        base = bases[i % 3]
        prompts.append(tuple(base[: rng.randint(1, 24)] + [rng.randrange(256)
                                                            for _ in range(rng.randint(0, 4))]))
    return prompts


async def one(stub: pb_grpc.GenerationStub, i: int, rng: random.Random,
              prompts: list[tuple[int, ...]]) -> Outcome:
    kind = rng.choice(KINDS)
    key = (rng.randrange(len(prompts)), rng.randrange(len(SAMPLINGS)), rng.random() < 0.8)
    out = Outcome(kind, key, rng.randint(1, MAX_NEW))
    req = build_request(token_ids=prompts[key[0]], request_id=f"soak-{i}",
                        max_new_tokens=out.max_new, ignore_eos=key[2], **SAMPLINGS[key[1]])
    try:
        if kind == "unary":
            resp = await stub.Generate(req, timeout=60)
            out.tokens, out.finish = list(resp.token_ids), resp.finish_reason
            out.usage_tokens = resp.usage.completion_tokens
            return out
        timeout = rng.uniform(0.001, 0.02) if kind == "deadline" else 60
        cancel_after = rng.randint(0, 3)  # messages read before cancelling (0: at once)
        call = stub.StreamGenerate(req, timeout=timeout)
        if kind == "cancel" and cancel_after == 0:
            await asyncio.sleep(0)
            call.cancel()
            out.code = "CANCELLED"
            return out  # reading a call cancelled by its caller raises CancelledError
        async for msg in call:
            out.tokens.extend(msg.token_ids)
            if msg.finish_reason:
                out.finish, out.usage_tokens = msg.finish_reason, msg.usage.completion_tokens
            elif kind == "abort" and len(out.tokens) == 1:
                await stub.Abort(pb.AbortRequest(request_id=req.request_id), timeout=60)
            elif kind == "cancel" and len(out.tokens) >= cancel_after:
                call.cancel()
                out.code = "CANCELLED"
                break
    except grpc.aio.AioRpcError as exc:
        out.code = exc.code().name
    return out


async def soak(target: str, prompts: list[tuple[int, ...]], rng: random.Random,
               n: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                outcomes.append(await one(stub, i, rng, prompts))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


def idle(server) -> bool:  # noqa: ANN001
    h = server.handle
    return (h.scheduler.num_live == 0 and h.state.engine_loop.num_in_flight == 0
            and h.scheduler.slots.num_used == 0 and h.scheduler.num_waiting == 0
            and h.scheduler.num_running == 0)


@pytest.mark.timeout(300)
def test_soak_with_cancels_and_deadlines_leaks_nothing_and_matches_solo_runs(
    make_server, engine_alone  # noqa: ANN001
) -> None:
    from scheduler.request import Request
    from scheduler.text import IncrementalText

    rng = random.Random(SEED)
    prompts = make_prompts(rng)
    eos = set(engine_alone.model_config.eos_token_ids)
    solo = {}
    for p in range(len(prompts)):
        for s, sampling in enumerate(SAMPLINGS):
            ids = list(engine_alone.generate(list(prompts[p]), SamplingParams(**sampling),
                                             max_new_tokens=MAX_NEW, ignore_eos=True).token_ids)
            solo[(p, s, True)] = ids
            # without ignore_eos the same tokens, up to and including the first EOS
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            solo[(p, s, False)] = ids[:cut]

    server = make_server(max_slots=16, max_queue=4 * CONCURRENCY)
    warm = asyncio.run(soak(server.target, prompts, rng, N_REQUESTS // 20))
    wait_for(lambda: idle(server), what="the server to go idle after the warm-up")
    gc.collect()
    rss_before = rss_bytes()
    outcomes = warm + asyncio.run(soak(server.target, prompts, rng, N_REQUESTS))
    wait_for(lambda: idle(server), what="every request to be released")

    tally = Counter((o.kind, o.code) for o in outcomes)
    unexpected = {k: v for k, v in tally.items() if k[1] not in ("OK", "CANCELLED",
                                                                  "DEADLINE_EXCEEDED")}
    assert not unexpected, f"unexpected status codes: {unexpected} (all: {tally})"
    for o in outcomes:
        want = solo[o.key][: o.max_new]
        if o.code == "OK" and o.finish in (pb.LENGTH, pb.STOP):
            assert o.tokens == want, (o, want)
            assert o.usage_tokens == len(o.tokens)
        else:  # cut short: cancelled, deadline, aborted
            assert o.code != "OK" or o.finish == pb.ABORTED, o
            assert o.tokens == want[: len(o.tokens)], (o, want)
    finished = sum(o.code == "OK" and o.finish != pb.ABORTED for o in outcomes)
    assert finished > N_REQUESTS // 2, tally
    assert tally[("cancel", "CANCELLED")] > 0 and tally[("abort", "OK")] > 0, tally

    h = server.handle
    assert not h.scheduler._texts, "detokenizers left behind"
    gc.collect()
    left = [x for x in gc.get_objects() if type(x) is IncrementalText
            or (type(x) is Request and x.request_id.startswith("soak-"))]
    assert not left, f"{len(left)} requests or detokenizers still referenced"
    growth = rss_bytes() - rss_before
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over {N_REQUESTS} requests"
    m = scrape(server.metrics_port)
    for gauge in ("num_requests_running", "num_requests_waiting", "slots_used",
                  "kv_cache_usage_ratio"):
        assert m[f"gptoss_{gauge}"] == 0, gauge
    served = sum(v for k, v in m.items() if k.startswith("gptoss_requests_total{"))
    assert finished <= served <= len(outcomes)
    # and it still serves correctly
    again = asyncio.run(soak(server.target, prompts, random.Random(1), 20))
    assert all(o.code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED") for o in again)
