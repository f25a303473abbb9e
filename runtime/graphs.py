"""One CUDA graph per decode batch-size bucket (DESIGN §5).

A decode step of n slots replays the graph of the smallest bucket ≥ n; rows n … bucket−1 are padding
that points at the dummy cache row. Graphs are captured largest-first into one shared memory pool,
after an eager warm-up of each bucket (so Triton compiles outside capture). Inputs live in static
device buffers that each replay overwrites; the sampler runs inside the graph, so a replay ends with
the next token ids (and their logprobs) already in static output buffers. Rows whose token is
PREVIOUS_TOKEN read it inside the graph from `last_tokens` (what each slot sampled last), and
every replay writes its sampled tokens there: a step can be launched before the host has seen
the previous one's tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from kernels.sampling import seed_to_int64
from runtime.batch import Batch
from runtime.model import Model
from runtime.sampler import PendingTokens, SampleFn
from runtime.types import SampledToken, SeqWork

log = logging.getLogger(__name__)


def default_buckets(max_slots: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 40, … (steps of 8 past 16), always ending at max_slots."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_slots]
    sizes += list(range(24, max_slots, 8))
    return sorted(set(sizes + [max_slots]))


class GraphRunner:
    def __init__(
        self, model: Model, sample_fn: SampleFn, max_slots: int, buckets: Sequence[int] | None = None,
        last_tokens: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.sample_fn = sample_fn
        self.device = model.w.embedding.device
        self.dummy_slot = max_slots  # the KV cache's extra row
        self.buckets = sorted(set(buckets or default_buckets(max_slots)))
        if self.buckets[-1] < max_slots or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must cover 1 … {max_slots}")
        n = self.buckets[-1]
        dev = self.device

        # [max_slots + 1] int64: the token each slot sampled last (the engine's; padding rows
        # write the dummy row)
        self.last_tokens = (last_tokens if last_tokens is not None
                            else torch.zeros(max_slots + 1, dtype=torch.long, device=dev))
        # Static inputs: one int64 and one fp32 block, so a step uploads them in two copies from
        # pinned staging buffers. Rows: token id, position, slot, top-k, seed | temperature,
        # top-p, min-p; [5, n] and [3, n]. Two staging sets, used in turn: while step n+1 is
        # staged, step n's upload may still be queued behind step n−1 on the stream.
        self.ints = torch.zeros(5, n, dtype=torch.long, device=dev)
        self.floats = torch.zeros(3, n, dtype=torch.float32, device=dev)
        self._ints_host = [torch.zeros(5, n, dtype=torch.long).pin_memory() for _ in range(2)]
        self._floats_host = [torch.zeros(3, n, dtype=torch.float32).pin_memory() for _ in range(2)]
        self.token_ids, self.positions, self.slot_ids, self.top_k, self.seeds = self.ints
        self.temperature, self.top_p, self.min_p = self.floats
        self.rows = torch.arange(n, device=dev)
        # static outputs per bucket (each graph writes its own)
        self.out_tokens: dict[int, torch.Tensor] = {}
        self.out_logprobs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0

    def _batch(self, b: int) -> Batch:
        slots = self.slot_ids[:b]
        tokens = self.token_ids[:b]
        return Batch(
            token_ids=torch.where(tokens >= 0, tokens, self.last_tokens[slots]),
            positions=self.positions[:b],
            slot_ids=slots,
            cu_seqlens=list(range(b + 1)),
            seq_slots=[self.dummy_slot] * b,  # unused on the decode path
            seq_start_pos=[0] * b,
            logits_rows=self.rows[:b],
            decode_only=True,
        )

    def _run(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward(self._batch(b))  # [b, V]
        out = self.sample_fn(
            logits, self.temperature[:b], self.top_k[:b], self.top_p[:b], self.min_p[:b],
            self.seeds[:b], self.positions[:b] + 1, num_top_logprobs=0,
        )
        self.last_tokens.index_copy_(0, self.slot_ids[:b], out.tokens)
        return out.tokens, out.logprobs

    def capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        self.slot_ids.fill_(self.dummy_slot)
        self.temperature.fill_(1.0)
        self.top_p.fill_(1.0)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in self.buckets:  # compile every kernel variant outside capture
                self._run(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):  # largest first: later graphs reuse its pool memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                tokens, logprobs = self._run(b)
            self.graphs[b], self.out_tokens[b], self.out_logprobs[b] = graph, tokens, logprobs
        torch.cuda.synchronize(self.device)
        used = (free0 - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info(
            "captured %d CUDA graphs (buckets %s) in %.1fs using %.0f MiB",
            len(self.graphs), self.buckets, time.perf_counter() - t0, used,
        )

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch of {n} exceeds the largest graph bucket {self.buckets[-1]}")

    @staticmethod
    def can_run(works: Sequence[SeqWork]) -> bool:
        """Graphs cover plain decode; penalties and top-N logprobs take the eager path."""
        return all(
            len(w.token_ids) == 1 and w.sample and not w.sampling.has_penalties
            and w.sampling.top_logprobs == 0
            for w in works
        )

    def run(self, works: Sequence[SeqWork]) -> list[SampledToken]:
        return self.launch(works).result()

    def launch(self, works: Sequence[SeqWork]) -> PendingTokens:
        """Stage the inputs, replay, queue the tokens' copy to the host; no host sync."""
        n = len(works)
        b = self.bucket_for(n)
        pad = [0] * (b - n)
        sp = [w.sampling for w in works]
        ints_host = self._ints_host[self.replays % 2]
        floats_host = self._floats_host[self.replays % 2]
        # This staging set's last upload (two launches ago) ran before that step's tokens were
        # read, which the caller did before launching again.
        ints_host[:, :b] = torch.tensor([
            [w.token_ids[0] for w in works] + pad,
            [w.start_pos for w in works] + pad,
            [w.slot for w in works] + [self.dummy_slot] * (b - n),
            [s.top_k for s in sp] + pad,
            [seed_to_int64(s.seed) for s in sp] + pad,
        ], dtype=torch.long)
        floats_host[:, :b] = torch.tensor([
            [s.temperature for s in sp] + [1.0] * (b - n),
            [s.top_p for s in sp] + [1.0] * (b - n),
            [s.min_p for s in sp] + pad,
        ], dtype=torch.float32)
        self.ints[:, :b].copy_(ints_host[:, :b], non_blocking=True)
        self.floats[:, :b].copy_(floats_host[:, :b], non_blocking=True)
        self.graphs[b].replay()
        self.replays += 1
        # SampleOutput-like view of the static outputs: tokens and logprobs only (graphs do not
        # serve top-N logprobs, see can_run)
        out = _Outputs(self.out_tokens[b], self.out_logprobs[b])
        return PendingTokens.of(out, works, rows=n)


class _Outputs:
    """The fields of a SampleOutput that PendingTokens reads, from a graph's static outputs."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.tokens, self.logprobs = tokens, logprobs
        self.top_ids = self.top_logprobs = None
