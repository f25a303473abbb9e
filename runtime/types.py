"""Plain-data boundary between the scheduler and the engine (DESIGN §1).

The scheduler builds a `StepPlan` from Python ints and floats; `Engine.step(plan)` returns a
`StepResult`. Neither side sees the other's internals: no tensors cross this line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0  # keep tokens with p ≥ min_p · p_max; 0 = off
    # Counter-based RNG key: the same seed gives the same tokens whatever else is in the batch.
    # The scheduler assigns a random seed to requests that did not ask for one.
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # also return the N most likely tokens with their logprobs

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or abs(value) > 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be ≥ 0, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


GREEDY = SamplingParams(temperature=0.0)

# A decode row's token id when that token is still being sampled by the step in flight: the
# engine reads it on the device from what the slot's previous step sampled (overlapped
# scheduling: step n+1 is planned and launched before step n's tokens reach the host).
PREVIOUS_TOKEN = -1


@dataclass(frozen=True)
class SeqWork:
    """One slot's share of a step: feed `token_ids` at positions `start_pos …`, maybe sample.

    A prefill chunk feeds many tokens; a decode feeds one (the last sampled token, or
    PREVIOUS_TOKEN for the one the slot's previous step sampled on the device). The KV cache row
    `slot` must already hold positions `0 … start_pos-1` of this sequence (or be about to, from
    the step in flight).
    """

    slot: int
    token_ids: tuple[int, ...]
    start_pos: int
    sample: bool  # sample the token that follows the last fed one (last chunk, or a decode)
    sampling: SamplingParams = GREEDY
    # Only filled when sampling.has_penalties: the context the penalties look at.
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    work: tuple[SeqWork, ...]

    @property
    def is_decode_only(self) -> bool:
        return all(len(w.token_ids) == 1 for w in self.work)

    @property
    def num_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.work)


@dataclass(frozen=True)
class SampledToken:
    slot: int
    token_id: int
    logprob: float | None = None  # of the chosen token, when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class StepResult:
    tokens: tuple[SampledToken, ...]  # one per SeqWork with sample=True, in plan order
    kind: str  # "prefill" when any chunk had > 1 token, else "decode"
    duration_s: float = 0.0
    num_tokens: int = 0  # tokens fed through the model this step
    cuda_graph: bool = False  # the step replayed a captured graph
    extra: dict[str, float] = field(default_factory=dict)
