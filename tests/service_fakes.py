"""Deterministic stand-ins for the runtime, for scheduler and service tests.

`FakeEngine` keeps per-slot token rows like a KV cache and picks the next token from a hash of the
whole row, so any scheduling mistake (wrong start_pos, wrong prefix reuse, tokens fed twice) changes
the output and `generate_alone` no longer matches. `ByteTokenizer` is byte-level: ids 0…255 are
bytes, so multi-byte UTF-8 characters span several tokens like in a real BPE vocabulary.
"""

from __future__ import annotations

import threading
import zlib
from array import array
from collections.abc import Sequence

from runtime.config import ModelConfig
from runtime.types import PREVIOUS_TOKEN, SampledToken, SamplingParams, StepPlan, StepResult

EOS = 256


class ByteTokenizer:
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def next_token(seq: Sequence[int], sampling: SamplingParams, vocab_size: int) -> int:
    key = array("I", seq).tobytes()
    if not sampling.greedy:  # counter-based: depends on (seed, position) and the sequence
        key += sampling.seed.to_bytes(8, "little") + len(seq).to_bytes(4, "little")
    return zlib.crc32(key) % vocab_size


class FakeEngine:
    """Implements `Engine.step` (and its halves, launch/collect, as the scheduler's overlapped
    mode uses them) on plain lists; checks the plan's invariants as it goes. A PREVIOUS_TOKEN
    row reads the token its slot sampled last, as the real engine does on the device."""

    def __init__(
        self,
        max_slots: int = 4,
        max_context: int = 256,
        max_chunk_tokens: int = 32,
        vocab_size: int = 260,
        prefix_reuse_slack: int = 0,
        script: Sequence[int] | None = None,
    ) -> None:
        """`script`: every request generates exactly these tokens (then EOS), whatever its prompt."""
        self.max_slots = max_slots
        self.max_context = max_context
        self.max_chunk_tokens = max_chunk_tokens
        self.vocab_size = vocab_size
        self.prefix_reuse_slack = prefix_reuse_slack
        self.rows: list[list[int]] = [[] for _ in range(max_slots + 1)]
        self.script = list(script) if script is not None else None
        self._gen_start: dict[int, int] = {}  # slot → position of its first generated token
        # What the service reads from a real Engine:
        self.model_config = ModelConfig(vocab_size=vocab_size, eos_token_ids=(EOS,))
        self.tokenizer = ByteTokenizer()
        self.plans: list[StepPlan] = []
        self.fail_next = False
        self.gate: threading.Event | None = None  # when set by a test, steps wait on it
        self.steps = 0
        self.last: list[int | None] = [None] * (max_slots + 1)  # what each slot sampled last
        self.in_flight = 0  # launched, not collected (the scheduler keeps ≤ 2: one running)

    def launch(self, plan: StepPlan) -> StepResult:
        assert self.in_flight <= 1, "more than one step in flight before a collect"
        result = self.step(plan)
        self.in_flight += 1
        return result

    def collect(self, handle: StepResult) -> StepResult:
        self.in_flight -= 1
        return handle

    def step(self, plan: StepPlan) -> StepResult:
        if self.gate is not None:
            self.gate.wait()
        self.steps += 1
        self.plans.append(plan)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected engine failure")
        assert len({w.slot for w in plan.work}) == len(plan.work), "a slot twice in one plan"
        out = []
        for w in plan.work:
            assert 0 <= w.slot < self.max_slots, w.slot
            assert 1 <= len(w.token_ids) <= self.max_chunk_tokens, len(w.token_ids)
            row = self.rows[w.slot]
            assert w.start_pos <= len(row), (w.start_pos, len(row))
            assert w.end_pos <= self.max_context
            tokens = w.token_ids
            if PREVIOUS_TOKEN in tokens:
                assert tokens == (PREVIOUS_TOKEN,), tokens
                assert self.last[w.slot] is not None, f"slot {w.slot} has sampled nothing"
                tokens = (self.last[w.slot],)
            del row[w.start_pos :]
            row.extend(tokens)
            if w.start_pos == 0:
                self._gen_start.pop(w.slot, None)
            if w.sample:
                out.append(SampledToken(w.slot, self._next(w.slot, row, w.sampling),
                                        logprob=-1.0 if w.sampling.logprobs else None))
                self.last[w.slot] = out[-1].token_id
        kind = "decode" if plan.is_decode_only else "prefill"
        return StepResult(tuple(out), kind=kind, duration_s=0.001, num_tokens=plan.num_tokens)


    def _next(self, slot: int, row: list[int], sampling: SamplingParams) -> int:
        if self.script is None:
            return next_token(row, sampling, self.vocab_size)
        k = len(row) - self._gen_start.setdefault(slot, len(row))
        return self.script[k] if k < len(self.script) else EOS


def generate_alone(
    prompt: Sequence[int], n: int, sampling: SamplingParams = SamplingParams(temperature=0.0),
    vocab_size: int = 260, stop_ids: Sequence[int] = (),
) -> list[int]:
    """What a request produces when it runs by itself (the oracle for batched runs)."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = next_token(seq, sampling, vocab_size)
        out.append(tok)
        seq.append(tok)
        if tok in stop_ids:
            break
    return out


class Throttled:
    """Wraps an engine so every step takes at least `delay_s`: long requests stay in flight long
    enough for a test to cancel, abort or drain them mid-stream (no timing is asserted)."""

    def __init__(self, engine: object, delay_s: float = 0.01) -> None:
        self._engine = engine
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def step(self, plan: StepPlan) -> StepResult:
        import time

        time.sleep(self.delay_s)
        return self._engine.step(plan)  # type: ignore[attr-defined]

    def launch(self, plan: StepPlan) -> object:
        import time

        time.sleep(self.delay_s)
        return self._engine.launch(plan)  # type: ignore[attr-defined]
