"""CUDA graphs for steps that carry prompt tokens: one graph per token bucket (DESIGN §5).

A step that is not plain decode (prompt chunks, usually with the running requests' decode rows)
would otherwise launch ~20 kernels per layer from Python: ~500 launches, whose host time under
load (the gRPC event loop shares the GIL) stretched such a step from ~48 ms of GPU work to ~77
ms (notes/gpu-runs.md, run 36). Here the model body — embedding, every layer, the final norm —
is one graph replay per step:

- Buckets of T tokens (`step_buckets`); a step of n ≤ T tokens is padded with one sequence of
  T − n tokens (token 0) on the dummy cache slot at positions 0 … T − n − 1, so padding rows are
  ordinary rows whose cache writes and reads stay in the dummy slot.
- Attention of every row (decode rows too) goes through the prefill kernel, whose tile table
  is a static device buffer of a fixed size per bucket: the host builds the step's tiles, checks
  the sequences against both cache kinds, and pads the table with empty tiles (0 rows).
- Inputs are staged in pinned memory (two sets, used in turn, as in runtime/graphs.py) and
  copied into static buffers; the graph writes the final normed hidden state of all T rows to
  a static output, from which the engine gathers the sampled rows and runs the unembedding and
  the sampler eagerly (the rows and their sampling parameters vary per step, and penalties
  and top-N logprobs are allowed here).

Graphs are captured largest-first into one memory pool after an eager pass per bucket (Triton
compiles outside capture). With `capture=False` (the CPU) the same padded static-buffer pass
runs eagerly, which is how the tests check the padding and the table on any backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from kernels.prefill_attention import (
    check_sequences,
    max_prefill_tiles,
    prefill_block_t,
    prefill_tiles,
)
from runtime.batch import Batch
from runtime.model import Model
from runtime.types import SeqWork

log = logging.getLogger(__name__)


def step_buckets(max_tokens: int, max_pad: int) -> list[int]:
    """Token counts with a graph: 16, 32, 48, 64, then steps of 32, always ending at max_tokens;
    no gap wider than max_pad (the padding sequence must fit the smallest cache, so tiny caches
    get finer buckets). Padding rows cost what real rows cost (the MoE routes them too): with
    steps of 128 a 1820-token step ran 5 % of padding and was 8 % slower on the GPU (run 41)."""
    if max_tokens < 1 or max_pad < 1:
        raise ValueError(f"max_tokens and max_pad must be ≥ 1, got {max_tokens}, {max_pad}")
    sizes, n = [], 0
    while n < max_tokens:
        step = 16 if n < 64 else 32
        n = min(n + min(step, max_pad), max_tokens)
        sizes.append(n)
    return sizes


class StepGraphs:
    def __init__(
        self, model: Model, max_slots: int, max_tokens: int, last_tokens: torch.Tensor,
        capture: bool = True,
    ) -> None:
        self.model = model
        cfg = model.config
        cache = model.cache
        self.device = model.w.embedding.device
        self.dummy_slot = max_slots  # the KV cache's extra row
        self.cache_slots = max_slots + 1
        # (capacity, window) of each layer kind: the step's sequences are checked against both
        self.kinds = sorted({(cache.k[i].shape[1], cfg.sliding_window if cfg.is_sliding(i) else 0)
                             for i in range(cfg.num_hidden_layers)})
        self.buckets = step_buckets(max_tokens, min(cap for cap, _ in self.kinds))
        self.block_t = prefill_block_t(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.use_graphs = capture
        self.last_tokens = last_tokens  # [max_slots + 1]: what each slot sampled last
        n = self.buckets[-1]
        self.max_tiles = {b: max_prefill_tiles(b, max_slots + 1, self.block_t)
                          for b in self.buckets}
        tiles = self.max_tiles[n]
        dev = self.device
        # Static inputs: token id, position, slot per row [3, n]; the tile table [tiles, 4].
        self.ints = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.table = torch.zeros(tiles, 4, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._ints_host = [torch.zeros(3, n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._table_host = [torch.zeros(tiles, 4, dtype=torch.int32, pin_memory=pin)
                            for _ in range(2)]
        # Static output: the final normed hidden state of every row, [n, H].
        self.hidden = torch.zeros(n, cfg.hidden_size, dtype=model.w.embedding.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"a step of {n} tokens exceeds the largest step graph {self.max_tokens}")

    def can_run(self, works: Sequence[SeqWork]) -> bool:
        return 0 < sum(len(w.token_ids) for w in works) <= self.max_tokens

    # ---- the body, on static buffers -----------------------------------------------------------
    def _batch(self, b: int) -> Batch:
        tokens, positions, slots = self.ints[0, :b], self.ints[1, :b], self.ints[2, :b]
        return Batch(
            token_ids=torch.where(tokens >= 0, tokens, self.last_tokens[slots]),
            positions=positions,
            slot_ids=slots,
            # Host lists of the capture-time contents: only the torch backend reads them (on
            # the CPU, where nothing is captured and every pass is built afresh).
            cu_seqlens=self._cu, seq_slots=self._seq_slots, seq_start_pos=self._starts,
            logits_rows=positions[:0],
            decode_only=False,
            tile_table=self.table[: self.max_tiles[b]],
        )

    def _body(self, b: int) -> None:
        self.hidden[:b].copy_(self.model.hidden(self._batch(b)))

    # ---- per step --------------------------------------------------------------------------------
    def _stage(self, works: Sequence[SeqWork], bucket: int | None = None) -> int:
        """Checks the step, fills a staging set and queues its copies; returns the bucket."""
        n = sum(len(w.token_ids) for w in works)
        b = bucket or self.bucket_for(n)
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu, seq_slots, starts = [0], [], []
        for w in works:
            k = len(w.token_ids)
            tokens.extend(w.token_ids)
            positions.extend(range(w.start_pos, w.start_pos + k))
            slots.extend([w.slot] * k)
            cu.append(cu[-1] + k)
            seq_slots.append(w.slot)
            starts.append(w.start_pos)
        if b > n:  # the padding sequence on the dummy slot
            pad = b - n
            tokens.extend([0] * pad)
            positions.extend(range(pad))
            slots.extend([self.dummy_slot] * pad)
            cu.append(b)
            seq_slots.append(self.dummy_slot)
            starts.append(0)
        for cap, window in self.kinds:
            check_sequences(cu, seq_slots, starts, b, self.cache_slots, cap, window)
            # the rope/KV-write kernel does not order duplicate cache targets within a step
            longest = max(cu[i + 1] - cu[i] for i in range(len(seq_slots)))
            if longest > cap:
                raise ValueError(f"a {longest}-token chunk exceeds the cache capacity {cap}")
        tiles = prefill_tiles(cu, seq_slots, starts, self.block_t)
        m = self.max_tiles[b]
        if len(tiles) > m:  # more sequences than slots: the engine's checks rule this out
            raise ValueError(f"{len(tiles)} attention tiles exceed the graph's table of {m}")
        ints_host = self._ints_host[self.replays % 2]
        table_host = self._table_host[self.replays % 2]
        # This staging set's last upload (two steps ago) ran before that step's tokens were
        # read, which the caller did before launching again (Engine.launch's contract).
        ints_host[:, :b] = torch.tensor([tokens, positions, slots], dtype=torch.long)
        table_host[:m] = 0
        table_host[:m, 3] = self.dummy_slot  # empty tiles: 0 rows on the dummy slot
        if tiles:
            table_host[: len(tiles)] = torch.tensor(tiles, dtype=torch.int32)
        # whole buffers (48 + 10 KB at 2048 tokens): contiguous, so truly asynchronous copies
        self.ints.copy_(ints_host, non_blocking=True)
        self.table.copy_(table_host, non_blocking=True)
        self._cu, self._seq_slots, self._starts = cu, seq_slots, starts
        return b

    def run(self, works: Sequence[SeqWork]) -> torch.Tensor:
        """Queue the step's body; returns the final normed hidden rows [n, H] (a view of the
        static output: gather from it before the next step is launched)."""
        b = self._stage(works)
        if self.use_graphs:
            self.graphs[b].replay()
        else:
            self._body(b)
        self.replays += 1
        return self.hidden[: sum(len(w.token_ids) for w in works)]

    # ---- start-up --------------------------------------------------------------------------------
    def _filler(self, tokens: int) -> list[SeqWork]:
        """A step of `tokens` tokens on the dummy slot for the eager pass before capture: chunks
        no longer than the smallest cache, all from position 0 (they write the same keys)."""
        most = min(cap for cap, _ in self.kinds)
        return [SeqWork(self.dummy_slot, (0,) * min(most, tokens - a), 0, sample=False)
                for a in range(0, tokens, most)]

    def capture(self) -> None:
        """Eager pass per bucket (compiles), then one graph per bucket, largest first."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in self.buckets:
                self._stage(self._filler(b), b)
                self._body(b)
                torch.cuda.current_stream(self.device).synchronize()  # staging sets reused
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._body(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        used = (free0 - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d step graphs (prompt-carrying steps, %d…%d tokens) in %.1fs using "
                 "%.0f MiB", len(self.graphs), self.buckets[0], self.buckets[-1],
                 time.perf_counter() - t0, used)

