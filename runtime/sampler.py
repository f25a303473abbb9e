"""Turns the logits of a step into one `SampledToken` per sampling sequence (DESIGN §6).

The per-row parameters come from each `SeqWork`; the math is `kernels.sampling` (torch reference on
the CPU, the Triton kernel on CUDA). The position that keys the RNG is the position the sampled
token will occupy, so a seeded request draws the same tokens in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    def sample(self, logits: torch.Tensor, works: Sequence[SeqWork]) -> list[SampledToken]:
        """logits: fp32 [M, V], row m for works[m]."""
        if not works:
            return []
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
        out = self.sample_fn(logits, **self.params(works), num_top_logprobs=n_top, raw_logits=raw)
        tokens = out.tokens.tolist()  # the one host sync of a step
        want_lp = any(w.sampling.logprobs or w.sampling.top_logprobs for w in works)
        lps = out.logprobs.tolist() if want_lp else [None] * len(works)
        top_ids = out.top_ids.tolist() if n_top else None
        top_lps = out.top_logprobs.tolist() if n_top else None
        result = []
        for m, w in enumerate(works):
            n = w.sampling.top_logprobs
            top = tuple(zip(top_ids[m][:n], top_lps[m][:n], strict=True)) if n else ()
            lp = lps[m] if (w.sampling.logprobs or n) else None
            result.append(SampledToken(slot=w.slot, token_id=tokens[m], logprob=lp, top_logprobs=top))
        return result
