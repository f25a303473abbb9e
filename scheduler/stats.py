"""Plain-data statistics the scheduler hands to a sink (the service turns them into metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepStats:
    kind: str  # "prefill" | "decode"
    duration_s: float
    batch_size: int  # sequences in the step
    num_tokens: int  # tokens fed through the model
    cuda_graph: bool
    prompt_tokens: int  # prompt tokens fed this step (prefill work)
    generated_tokens: int  # tokens sampled this step
    prefix_hit_tokens: int  # prompt tokens skipped thanks to prefix reuse (admitted this step)
    ttft_s: tuple[float, ...] = ()  # arrival → first token, for requests that got it this step
    inter_token_s: tuple[float, ...] = ()  # gaps between consecutive tokens of one request
    # the round's host time outside Engine.step (admission, planning, detokenization, stop
    # checks): time the GPU waits unless it overlaps something
    scheduler_s: float = 0.0


@dataclass(frozen=True)
class RequestStats:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    queue_s: float | None  # arrival → admission (None if never admitted)
    e2e_s: float  # arrival → finish


@dataclass(frozen=True)
class GaugeStats:
    num_running: int
    num_waiting: int
    slots_used: int
    kv_cache_usage_ratio: float  # tokens held by running requests / (max_slots · max_context)


class StatsSink(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_done(self, stats: RequestStats) -> None: ...

    def on_gauges(self, stats: GaugeStats) -> None: ...


class NullSink:
    def on_step(self, stats: StepStats) -> None:
        pass

    def on_request_done(self, stats: RequestStats) -> None:
        pass

    def on_gauges(self, stats: GaugeStats) -> None:
        pass
