"""GenerateRequest → scheduler Request, or an InvalidRequest with a message a user can act on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from proto.gptoss.v1 import generate_pb2 as pb
from runtime.types import SamplingParams
from scheduler.request import StopParams

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 128
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # beyond: logits overflow
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM)
SEED_MASK = (1 << 63) - 1  # the sampler keys its RNG with a signed 64-bit integer


class InvalidRequest(ValueError):
    """Bad client input: answered with INVALID_ARGUMENT and this message."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int
    max_new_tokens_limit: int
    max_request_bytes: int


@dataclass(frozen=True)
class Parsed:
    request_id: str
    text: str | None  # to tokenize (None when token ids were given)
    token_ids: tuple[int, ...] | None
    sampling: SamplingParams
    stop: StopParams
    random_seed: bool


def _field(msg, name: str, default):  # noqa: ANN001, ANN202
    return getattr(msg, name) if msg.HasField(name) else default


def parse(request: pb.GenerateRequest, limits: Limits) -> Parsed:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(f"request is {size} bytes; the limit is {limits.max_request_bytes}")
    rid = request.request_id
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidRequest(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} chars")
    kind = request.WhichOneof("prompt")
    text = ids = None
    if kind is None:
        raise InvalidRequest("prompt is missing: set `text` or `token_ids`")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("prompt text is empty")
        text = request.text
    else:
        ids = tuple(request.token_ids.token_ids)
        check_prompt_ids(ids, limits)
    return Parsed(rid, text, ids, _sampling(request, limits), _stop(request.stopping, limits),
                  random_seed=not request.sampling.HasField("seed"))


def check_prompt_ids(ids: tuple[int, ...], limits: Limits) -> None:
    if not ids:
        raise InvalidRequest("prompt token_ids is empty")
    bad = next((i for i, t in enumerate(ids) if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {ids[bad]} at prompt index {bad} is out of range (vocab size "
            f"{limits.vocab_size})"
        )
    if len(ids) >= limits.max_context:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens; the context holds {limits.max_context} "
            "(prompt + at least one new token)"
        )


def check_length(ids: tuple[int, ...], stop: StopParams, limits: Limits) -> None:
    """After tokenization: prompt + max_new_tokens must fit in the context."""
    check_prompt_ids(ids, limits)
    if stop.max_new_tokens is not None and len(ids) + stop.max_new_tokens > limits.max_context:
        raise InvalidRequest(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({stop.max_new_tokens}) exceeds the "
            f"context of {limits.max_context} tokens"
        )


def _sampling(request: pb.GenerateRequest, limits: Limits) -> SamplingParams:
    s = request.sampling
    top_k = _field(s, "top_k", 0)
    if top_k > limits.vocab_size:
        raise InvalidRequest(f"top_k ({top_k}) exceeds the vocab size ({limits.vocab_size})")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if s.HasField(name) and not math.isfinite(getattr(s, name)):
            raise InvalidRequest(f"{name} must be a finite number, got {getattr(s, name)}")
    repetition = _field(s, "repetition_penalty", 1.0)
    if not MIN_REPETITION_PENALTY <= repetition <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], "
            f"got {repetition}"
        )
    temperature = _field(s, "temperature", 1.0)
    if 0 < temperature < GREEDY_BELOW:
        temperature = 0.0  # dividing logits by ~0 overflows: it means greedy anyway
    n_logprobs = request.logprobs if request.HasField("logprobs") else 0
    n_top = request.top_logprobs if request.HasField("top_logprobs") else 0
    if max(n_logprobs, n_top) > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"logprobs and top_logprobs must be ≤ {MAX_TOP_LOGPROBS}")
    try:
        return SamplingParams(
            temperature=temperature,
            top_p=_field(s, "top_p", 1.0),
            top_k=top_k,
            min_p=_field(s, "min_p", 0.0),
            seed=_field(s, "seed", 0) & SEED_MASK,
            presence_penalty=_field(s, "presence_penalty", 0.0),
            frequency_penalty=_field(s, "frequency_penalty", 0.0),
            repetition_penalty=repetition,
            logprobs=request.HasField("logprobs") or request.HasField("top_logprobs"),
            top_logprobs=max(n_logprobs, n_top),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _stop(s: pb.StoppingCriteria, limits: Limits) -> StopParams:
    max_new = _field(s, "max_new_tokens", None)
    if max_new is not None and not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidRequest(
            f"max_new_tokens must be in 1..{limits.max_new_tokens_limit}, got {max_new}"
        )
    min_new = _field(s, "min_new_tokens", 0)
    if max_new is not None and min_new > max_new:
        raise InvalidRequest(f"min_new_tokens ({min_new}) exceeds max_new_tokens ({max_new})")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for text in s.stop:
        if not text or len(text) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
    bad = [t for t in s.stop_token_ids if t >= limits.vocab_size]
    if bad:
        raise InvalidRequest(f"stop_token_ids {bad[:5]} out of range (vocab {limits.vocab_size})")
    return StopParams(
        max_new_tokens=max_new, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos, min_new_tokens=min_new,
    )
