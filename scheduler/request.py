"""A generation request's lifecycle and the plain-data events the scheduler emits for it.

waiting ─admit─▶ prefilling ─first token─▶ running ─stop─▶ finished
    └──────────────── abort (any state) ─────────────────────▶ finished (ABORTED)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from runtime.types import SampledToken, SamplingParams


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens reached or the context is full
    STOP = "stop"  # EOS or one of stop_token_ids
    STOP_SEQUENCE = "stop_sequence"  # a stop string appeared in the text
    ABORTED = "aborted"  # Abort RPC, client cancel, deadline, shutdown
    ERROR = "error"  # the engine failed on this request's step


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class StopParams:
    """When generation ends. `max_new_tokens=None` means: until the context is full."""

    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be ≥ 0, got {self.min_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(eq=False)  # identity semantics: requests are compared and removed by identity
class Request:
    """Mutable per-request state, owned by the scheduler's (engine) thread once added."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stop: StopParams = field(default_factory=StopParams)
    # True when the client gave no seed: the scheduler draws one on admission.
    random_seed: bool = False
    arrival_s: float = 0.0
    state: RequestState = RequestState.WAITING
    slot: int | None = None
    num_fed: int = 0  # positions 0 … num_fed-1 of this sequence are in the slot's KV cache
    # … and 0 … num_scheduled-1 will be once the step in flight (if any) has run
    num_scheduled: int = 0
    pending_samples: int = 0  # tokens the step in flight samples for this request (0 or 1)
    cached_tokens: int = 0  # prompt tokens reused from the slot's earlier contents
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    admitted_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = tuple(int(t) for t in self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError("prompt must not be empty")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens at positions start … end-1 (prompt then output), without copying the rest:
        a decode step asks for one token and must not cost O(sequence length)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        head = self.prompt_ids[start:n] if start < n else ()
        return head + tuple(self.output_ids[max(start - n, 0) : end - n])

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the delta, and on the last one the finish."""

    request_id: str
    token_ids: tuple[int, ...] = ()  # new tokens
    text: str = ""  # new text (never a partial UTF-8 character, never a possible stop prefix)
    logprobs: tuple[SampledToken, ...] = ()  # one per new token when logprobs were asked for
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # set with FinishReason.ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
