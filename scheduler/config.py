"""SchedulerConfig and the scheduler's refusals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from runtime.types import StepPlan, StepResult


class QueueFull(Exception):
    """The waiting queue is at max_queue: try again later."""


class DuplicateRequest(ValueError):
    """A request with this id is already in flight."""


class StepEngine(Protocol):
    def step(self, plan: StepPlan) -> StepResult: ...


class OverlapEngine(StepEngine, Protocol):
    """An engine whose step comes in two halves (runtime.engine.Engine): `launch` queues the
    work and returns a handle at once, `collect(handle)` waits for the tokens; rows whose token
    is PREVIOUS_TOKEN read what their slot sampled in the step before."""

    def launch(self, plan: StepPlan) -> object: ...

    def collect(self, handle: object) -> StepResult: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int
    max_context: int
    max_chunk_tokens: int = 512  # longest prefill chunk of one request in one step
    max_step_tokens: int = 2048  # tokens fed per step, all requests together
    max_queue: int = 1024  # waiting (not yet admitted) requests; beyond: QueueFull
    prefix_reuse_slack: int = 0  # see SlotTable.reusable_prefix
    eos_token_ids: tuple[int, ...] = ()
    # Prefill batching under load: while ≥ prefill_batch_min_running requests are decoding,
    # new requests are admitted once their prompts add up to prefill_batch_tokens (or what the
    # step has left) or the oldest has waited prefill_max_wait_s. A step that carries prompt
    # tokens runs eagerly (no CUDA graph) and costs 2-4× a decode step whatever it carries
    # (H100, 20b), so under a steady trickle of arrivals admitting one request per step turned
    # most steps into such steps. 0 tokens: admit at once (no batching).
    prefill_batch_tokens: int = 1536
    prefill_max_wait_s: float = 0.25
    prefill_batch_min_running: int = 32
    # Overlapped scheduling (engines with launch/collect): step n+1 is planned and launched
    # before step n's tokens are read, so the host's per-step work (reading tokens, stop checks,
    # detokenization, streaming, planning) runs while the GPU computes instead of between steps.
    # A request that stops at step n has computed one extra row in step n+1, which is dropped.
    overlap: bool = True

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_context", "max_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_step_tokens < self.max_slots:
            # Every running request must get its decode token in every step.
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be ≥ max_slots ({self.max_slots})"
            )
        if self.max_queue < 0 or self.prefix_reuse_slack < 0:
            raise ValueError("max_queue and prefix_reuse_slack must be ≥ 0")
        if self.prefill_batch_tokens < 0 or self.prefill_batch_min_running < 0:
            raise ValueError("prefill_batch_tokens and prefill_batch_min_running must be ≥ 0")
        if not 0 <= self.prefill_max_wait_s <= 60:
            raise ValueError(f"prefill_max_wait_s must be in [0, 60], got {self.prefill_max_wait_s}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
