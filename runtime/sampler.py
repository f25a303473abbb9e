"""Turns the logits of a step into one `SampledToken` per sampling sequence (DESIGN §6).

The per-row parameters come from each `SeqWork`; the math is `kernels.sampling` (torch reference on
the CPU, the Triton kernel on CUDA). The position that keys the RNG is the position the sampled
token will occupy, so a seeded request draws the same tokens in any batch. `PendingTokens` carries
a step's tokens to the host without stalling it (the copy waits on the stream, not the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.sampling import SampleOutput, apply_penalties_ref, sample_ref, seed_to_int64
from runtime.batch import to_device
from runtime.types import SampledToken, SeqWork

SampleFn = Callable[..., SampleOutput]


class Sampler:
    def __init__(self, device: torch.device | str, sample_fn: SampleFn = sample_ref) -> None:
        self.device = torch.device(device)
        self.sample_fn = sample_fn

    def params(self, works: Sequence[SeqWork]) -> dict[str, torch.Tensor]:
        """The per-row parameter tensors, [M] each."""
        sp = [w.sampling for w in works]

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, self.device)

        return {
            "temperature": t([s.temperature for s in sp], torch.float32),
            "top_k": t([s.top_k for s in sp], torch.long),
            "top_p": t([s.top_p for s in sp], torch.float32),
            "min_p": t([s.min_p for s in sp], torch.float32),
            "seeds": t([seed_to_int64(s.seed) for s in sp], torch.long),
            "positions": t([w.end_pos for w in works], torch.long),
        }

    def sample_device(self, logits: torch.Tensor, works: Sequence[SeqWork]) -> SampleOutput:
        """The tokens of `works` (one per row of fp32 logits [M, V]), left on the device."""
        raw = logits
        if any(w.sampling.has_penalties for w in works):
            logits = apply_penalties_ref(
                logits,
                [w.prompt_token_ids for w in works],
                [w.output_token_ids for w in works],
                [w.sampling.presence_penalty for w in works],
                [w.sampling.frequency_penalty for w in works],
                [w.sampling.repetition_penalty for w in works],
            )
        n_top = max(w.sampling.top_logprobs for w in works)
        return self.sample_fn(logits, **self.params(works), num_top_logprobs=n_top, raw_logits=raw)

    def sample(self, logits: torch.Tensor, works: Sequence[SeqWork]) -> list[SampledToken]:
        """logits: fp32 [M, V], row m for works[m]."""
        if not works:
            return []
        return PendingTokens.of(self.sample_device(logits, works), works).result()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy queued behind the work that produces it (pinned: no stall)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass
class PendingTokens:
    """A step's sampled tokens on their way to the host. The copies are queued on the stream
    behind the step's kernels, so the host can plan and launch the next step meanwhile;
    `result()` waits for them (the step's one host sync)."""

    works: Sequence[SeqWork]
    tokens: torch.Tensor  # [M] int64, host
    logprobs: torch.Tensor | None  # [M] fp32, host, when any row asked for logprobs
    top_ids: torch.Tensor | None  # [M, N], when any row asked for top logprobs
    top_logprobs: torch.Tensor | None
    event: torch.cuda.Event | None  # recorded after the copies (CUDA)

    @classmethod
    def of(cls, out: SampleOutput, works: Sequence[SeqWork], rows: int | None = None
           ) -> PendingTokens:
        """Queue the copies of the first `rows` rows (default: all) of `out`."""
        n = len(works) if rows is None else rows
        want_lp = any(w.sampling.logprobs or w.sampling.top_logprobs for w in works)
        n_top = max((w.sampling.top_logprobs for w in works), default=0)
        pending = cls(
            works, _to_host(out.tokens[:n]),
            _to_host(out.logprobs[:n]) if want_lp else None,
            _to_host(out.top_ids[:n]) if n_top else None,
            _to_host(out.top_logprobs[:n]) if n_top else None,
            None,
        )
        if out.tokens.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending

    def result(self) -> list[SampledToken]:
        if self.event is not None:
            self.event.synchronize()
        tokens = self.tokens.tolist()
        lps = self.logprobs.tolist() if self.logprobs is not None else None
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        result = []
        for m, w in enumerate(self.works):
            n = w.sampling.top_logprobs
            top = tuple(zip(top_ids[m][:n], top_lps[m][:n], strict=True)) if n else ()
            lp = lps[m] if lps is not None and (w.sampling.logprobs or n) else None
            result.append(SampledToken(slot=w.slot, token_id=tokens[m], logprob=lp, top_logprobs=top))
        return result
