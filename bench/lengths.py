"""Seeded synthetic workloads: prompt and output lengths shaped like ShareGPT, random token ids.

ShareGPT conversations (the usual serving benchmark) have long-tailed lengths: most prompts and
replies are a few hundred tokens, a few are thousands. A lognormal with a median of ~200 tokens and
sigma ~1 reproduces that shape without downloading the data set. Prompts are random token ids below
the vocab size, so no tokenizer is needed and no two prompts share a prefix (no prefix-cache hits
flatter the figures); outputs use `ignore_eos` with max_new_tokens = the sampled length, so every
request generates exactly its length.

A distribution is written `KIND[:A[:B]]`:
    sharegpt          lognormal, median 200, sigma 1.0 (prompts) / 0.9 (outputs)
    lognormal:M:S     median M tokens, sigma S (of the log)
    uniform:LO:HI     integers LO…HI inclusive
    fixed:N           always N
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAREGPT_PROMPT = ("lognormal", 200.0, 1.0)
SHAREGPT_OUTPUT = ("lognormal", 200.0, 0.9)


@dataclass(frozen=True)
class LengthDist:
    kind: str  # "lognormal" | "uniform" | "fixed"
    a: float  # lognormal: median; uniform: low; fixed: the length
    b: float = 0.0  # lognormal: sigma; uniform: high

    def __post_init__(self) -> None:
        if self.kind not in ("lognormal", "uniform", "fixed"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if self.a < 1:
            raise ValueError(f"{self.kind}: lengths must be ≥ 1, got {self.a}")
        if self.kind == "lognormal" and not 0 <= self.b <= 5:
            raise ValueError(f"lognormal sigma must be in [0, 5], got {self.b}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform: high ({self.b}) < low ({self.a})")

    @classmethod
    def parse(cls, spec: str, role: str = "prompt") -> LengthDist:
        """`sharegpt`, `lognormal:200:1.0`, `uniform:16:256` or `fixed:128`."""
        kind, *nums = spec.strip().lower().split(":")
        if kind == "sharegpt" and not nums:
            return cls(*(SHAREGPT_PROMPT if role == "prompt" else SHAREGPT_OUTPUT))
        want = {"lognormal": 2, "uniform": 2, "fixed": 1}.get(kind)
        if want is None or len(nums) != want:
            raise ValueError(
                f"bad length distribution {spec!r}: use sharegpt, lognormal:MEDIAN:SIGMA, "
                "uniform:LO:HI or fixed:N"
            )
        try:
            values = [float(x) for x in nums]
        except ValueError:
            raise ValueError(f"bad number in length distribution {spec!r}") from None
        return cls(kind, *values)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.lognormvariate(math.log(self.a), self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    seed: int  # the request's sampling seed (reproducible runs)


def clip_lengths(prompt: int, output: int, max_context: int, max_new_limit: int) -> tuple[int, int]:
    """Fit a sampled (prompt, output) pair in the server's limits: the output is capped first (at
    the server's max_new_tokens and at half the context, so long outputs keep some prompt), then
    the prompt takes what is left of the context."""
    output = max(1, min(output, max_new_limit, max(1, max_context // 2)))
    prompt = max(1, min(prompt, max_context - output))
    return prompt, output


def make_workload(
    n: int,
    prompt_dist: LengthDist,
    output_dist: LengthDist,
    *,
    vocab_size: int,
    max_context: int,
    max_new_limit: int | None = None,
    seed: int = 0,
) -> list[RequestSpec]:
    """`n` requests; the same arguments always give the same requests."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if max_context < 2:
        raise ValueError(f"max_context must be ≥ 2, got {max_context}")
    rng = random.Random(seed)
    limit = max_context - 1 if max_new_limit is None else max_new_limit
    specs = []
    for i in range(n):
        p, o = clip_lengths(prompt_dist.sample(rng), output_dist.sample(rng), max_context, limit)
        ids = tuple(rng.randrange(vocab_size) for _ in range(p))
        specs.append(RequestSpec(i, ids, o, rng.getrandbits(63)))
    return specs
