"""Engine: owns the model, its KV cache and the sampler; runs one `StepPlan` at a time.

`Engine.step(plan) -> StepResult` is what the scheduler calls (plain data both ways, DESIGN §1),
or its two halves: `launch(plan)` queues the step's GPU work and returns at once, `collect()`
waits for its tokens, so the scheduler can plan and launch step n+1 while step n runs (its decode
rows then carry PREVIOUS_TOKEN, read on the device from what the slot sampled last).
`generate()` is a one-request loop over `step()` for the CLI and tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kernels.sampling import sample_ref
from runtime.batch import build_batch, to_device
from runtime.config import ModelConfig
from runtime.graphs import GraphRunner
from runtime.kv_cache import CacheShape, KVCache
from runtime.model import Model
from runtime.model_weights import ModelWeights
from runtime.sampler import PendingTokens, SampleFn, Sampler
from runtime.step_graphs import StepGraphs
from runtime.tokenizer import Tokenizer
from runtime.types import (
    GREEDY,
    PREVIOUS_TOKEN,
    SampledToken,
    SamplingParams,
    SeqWork,
    StepPlan,
    StepResult,
)

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the built-in tiny random model
    device: str = "cpu"
    dtype: str = "bfloat16"
    max_slots: int = 8
    max_context: int = 2048
    max_chunk_tokens: int = 512  # longest prefill chunk of one sequence in one step
    cuda_graphs: bool = True
    # CUDA graphs also for prompt-carrying (mixed/prefill) steps of up to the warm-up's step
    # tokens (runtime/step_graphs.py); needs cuda_graphs and the Triton kernels.
    step_graphs: bool = True
    kernels: str = "auto"  # "auto" (Triton on CUDA, torch on CPU) | "torch" | "triton"
    # CUDA: share of the GPU's memory the engine may hold (weights + KV cache + activations),
    # like vLLM's gpu_memory_utilization; max_slots is lowered to what fits.
    gpu_memory_fraction: float = 0.90

    def __post_init__(self) -> None:
        if not 0.05 <= self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in [0.05, 1], got {self.gpu_memory_fraction}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, got {self.kernels!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        CacheShape(self.max_slots, self.max_context, self.max_chunk_tokens)  # validates


def _powers_of_two(limit: int) -> list[int]:
    sizes, n = [], 1
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


@dataclass
class InFlight:
    """A launched step: what `Engine.collect` needs to finish it."""

    pending: PendingTokens | None  # None: nothing sampled
    kind: str
    num_tokens: int
    cuda_graph: bool
    started_s: float  # perf_counter() at launch


@dataclass(frozen=True)
class GenerateOutput:
    token_ids: tuple[int, ...]
    finish_reason: str  # "length" | "stop"
    logprobs: tuple[float | None, ...] = ()


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        weights: ModelWeights | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Loads `config.model` (or the built-in tiny model); benchmarks may pass ready weights."""
        from runtime.synthetic import builtin_tiny
        from runtime.weights import load_checkpoint, load_tokenizer

        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        dtype = DTYPES[config.dtype]
        t0 = time.perf_counter()
        if weights is not None:
            source = f"given weights ({weights.config.name})"
            weights = weights.to(self.device, dtype)
            model_config = weights.config
            self.tokenizer = tokenizer or Tokenizer.byte_level(model_config.vocab_size)
        elif config.model is None:
            source = "built-in tiny (random weights)"
            model_config, weights, self.tokenizer = builtin_tiny(device=self.device, dtype=dtype)
        else:
            source = config.model
            weights = load_checkpoint(config.model, device=self.device, dtype=dtype)
            model_config = weights.config
            found = load_tokenizer(config.model)
            if found is None:
                raise ValueError(f"{config.model}: no tokenizer.json beside the weights")
            self.tokenizer = found
        self.model_config: ModelConfig = model_config
        max_context = min(config.max_context, model_config.max_position_embeddings)
        self.shape = self._plan_cache(
            CacheShape(config.max_slots, max_context, config.max_chunk_tokens), dtype
        )
        self.cache = KVCache(model_config, self.shape, self.device, dtype)
        self.model = Model(weights, self.cache, max_context, ops=self._ops())
        self.sampler = Sampler(self.device, self._sample_fn())
        # [max_slots + 1]: the token each slot sampled last, for PREVIOUS_TOKEN rows
        self.last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.long, device=self.device)
        self.graphs: GraphRunner | None = None
        self.step_graphs: StepGraphs | None = None  # built by warmup(), which knows the step size
        if self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = GraphRunner(self.model, self.sampler.sample_fn, self.max_slots,
                                      last_tokens=self.last_tokens)
        log.info(
            "engine ready: model=%s device=%s dtype=%s slots=%d context=%d kv_cache=%.1f MiB "
            "kernels=%s load=%.2fs",
            source, self.device, config.dtype,
            self.max_slots, self.max_context, self.cache.nbytes() / 2**20, self.model.ops.name,
            time.perf_counter() - t0,
        )

    def _plan_cache(self, wanted: CacheShape, dtype: torch.dtype) -> CacheShape:
        """On CUDA, fit max_slots × max_context into the memory left under the fraction."""
        if self.device.type != "cuda":
            return wanted
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        # activations of the largest prefill step and the graphs' pool: a generous fixed reserve
        reserve = 2 << 30
        budget = int(self.config.gpu_memory_fraction * total) - used - reserve
        per_slot = wanted.bytes_per_slot(self.model_config, dtype)
        fits = budget // per_slot if budget > 0 else 0
        if fits < 1:
            raise RuntimeError(
                f"no room for even one KV-cache slot of {wanted.max_context} tokens "
                f"({per_slot / 2**20:.0f} MiB): {budget / 2**30:.1f} GiB left under "
                f"--gpu-memory-fraction {self.config.gpu_memory_fraction}; lower --max-context"
            )
        slots = min(wanted.max_slots, int(fits))
        log.info(
            "KV cache plan: %d slots × %d tokens = %.1f GiB (%.1f MiB/slot; %d would fit in "
            "%.1f GiB)", slots, wanted.max_context, slots * per_slot / 2**30, per_slot / 2**20,
            fits, budget / 2**30,
        )
        if slots < wanted.max_slots:
            log.warning("max_slots lowered from %d to %d to fit GPU memory", wanted.max_slots, slots)
        return CacheShape(slots, wanted.max_context, wanted.max_chunk_tokens)

    def _ops(self):  # noqa: ANN202 - returns an Ops
        from runtime.ops import TorchOps

        use_triton = self.config.kernels == "triton" or (
            self.config.kernels == "auto" and self.device.type == "cuda"
        )
        if use_triton:
            try:
                from runtime.ops_triton import TritonOps
            except ImportError as exc:
                if self.config.kernels == "triton":
                    raise
                log.warning("Triton kernels unavailable (%s); using the torch path", exc)
                return TorchOps()
            return TritonOps()
        return TorchOps()

    def _sample_fn(self) -> SampleFn:
        if self.model.ops.name == "triton":
            from kernels import sampling

            return getattr(sampling, "sample", sampling.sample_ref)
        return sample_ref

    # ---- facts the scheduler plans with ----------------------------------------------------------
    @property
    def max_slots(self) -> int:
        return self.shape.max_slots

    @property
    def max_context(self) -> int:
        return self.shape.max_context

    @property
    def max_chunk_tokens(self) -> int:
        return self.shape.max_chunk_tokens

    @property
    def prefix_reuse_slack(self) -> int:
        return self.shape.prefix_reuse_slack(self.model_config)

    def warmup(self, max_step_tokens: int | None = None) -> None:
        """Compiles kernels and captures the decode graphs, so first requests pay no start-up.

        On CUDA, Triton compiles a kernel variant per specialization and tile configuration, and
        the MoE picks its configuration by tokens per expert: one packed prefill step of every
        power-of-two size up to `max_step_tokens` compiles them all here rather than in the
        middle of a request. The slots' cache contents are junk afterwards, which is fine: a
        slot's cache is only reused for tokens the scheduler knows it holds.
        """
        t0 = time.perf_counter()
        limit = max_step_tokens or self.max_chunk_tokens
        sizes = [2, 3] if self.device.type == "cpu" else _powers_of_two(limit)
        for n in sizes:
            self.step(self._junk_prefill(n))
        warm = getattr(self.model.ops, "warm", None)
        if warm is not None and self.device.type == "cuda":
            t1 = time.perf_counter()
            cfg, kinds = self.model_config, {}
            for i in range(cfg.num_hidden_layers):  # one layer of each kind (ring or full)
                window = cfg.sliding_window if cfg.is_sliding(i) else 0
                kinds.setdefault(window, (self.cache.k[i], self.cache.v[i], window))
            warm(self.model.w, list(kinds.values()), limit, self.max_slots)
            log.info("warm-up: MoE at 1…%d tokens, mixed-step attention: %.1fs", limit,
                     time.perf_counter() - t1)
        self.step(StepPlan((SeqWork(slot=0, token_ids=(0,), start_pos=2, sample=True),)))
        if self.graphs is not None and not self.graphs.graphs:
            self.graphs.capture()
        if (self.graphs is not None and self.config.step_graphs and self.step_graphs is None
                and self.model.ops.name == "triton"):
            self.step_graphs = StepGraphs(self.model, self.max_slots, limit, self.last_tokens)
            self.step_graphs.capture()
        log.info("warm-up: prefill sizes %s in %.1fs", sizes, time.perf_counter() - t0)

    def _junk_prefill(self, n: int) -> StepPlan:
        """A prefill step of n tokens spread over as many slots as the chunk limit needs."""
        chunk = min(self.max_chunk_tokens, self.max_context - 1)
        works, slot = [], 0
        while n > 0 and slot < self.max_slots:
            k = min(n, chunk)
            works.append(SeqWork(slot=slot, token_ids=(0,) * k, start_pos=0, sample=True))
            n, slot = n - k, slot + 1
        return StepPlan(tuple(works))

    # ---- the step -------------------------------------------------------------------------------
    def validate(self, plan: StepPlan) -> None:
        seen: set[int] = set()
        vocab = self.model_config.vocab_size
        for w in plan.work:
            if not 0 <= w.slot < self.max_slots:
                raise ValueError(f"slot {w.slot} outside 0..{self.max_slots - 1}")
            if w.slot in seen:
                raise ValueError(f"slot {w.slot} appears twice in one step")
            seen.add(w.slot)
            if not w.token_ids:
                raise ValueError(f"slot {w.slot}: empty token chunk")
            if len(w.token_ids) > self.max_chunk_tokens:
                raise ValueError(
                    f"slot {w.slot}: chunk of {len(w.token_ids)} tokens exceeds max_chunk_tokens "
                    f"{self.max_chunk_tokens}"
                )
            if w.start_pos < 0 or w.end_pos > self.max_context:
                raise ValueError(
                    f"slot {w.slot}: positions {w.start_pos}..{w.end_pos - 1} exceed the context "
                    f"of {self.max_context}"
                )
            if w.token_ids == (PREVIOUS_TOKEN,):
                continue  # a decode row whose token the slot's previous step sampled
            bad = [t for t in w.token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"slot {w.slot}: token ids {bad[:5]} outside the vocab of {vocab}")

    def step(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def launch(self, plan: StepPlan) -> InFlight:
        """Queue the step's work (and its tokens' copy to the host); returns without waiting
        for the GPU. Every launch must be collected, in order, before the one after next."""
        t0 = time.perf_counter()
        self.validate(plan)
        if not plan.work:
            return InFlight(None, "decode", 0, False, t0)
        if self.graphs is not None and self.graphs.graphs and GraphRunner.can_run(plan.work):
            return InFlight(self.graphs.launch(plan.work), "decode", len(plan.work), True, t0)
        kind = "decode" if plan.is_decode_only else "prefill"
        sampling = [w for w in plan.work if w.sample]
        if self.step_graphs is not None and self.step_graphs.can_run(plan.work):
            hidden = self.step_graphs.run(plan.work)  # [T, H], final normed
            graph = self.step_graphs.use_graphs
            if not sampling:
                return InFlight(None, kind, hidden.shape[0], graph, t0)
            rows, slots = [], []
            end = 0
            for w in plan.work:
                end += len(w.token_ids)
                if w.sample:
                    rows.append(end - 1)
                    slots.append(w.slot)
            logits = self.model.unembed(hidden[to_device(rows, torch.long, self.device)])
            pending = self._sample(logits, sampling, to_device(slots, torch.long, self.device))
            return InFlight(pending, kind, hidden.shape[0], graph, t0)
        batch = build_batch(plan, self.device)
        if any(w.token_ids[0] == PREVIOUS_TOKEN for w in plan.work):
            tokens = batch.token_ids
            batch.token_ids = torch.where(tokens >= 0, tokens, self.last_tokens[batch.slot_ids])
        logits = self.model.forward(batch)  # [M, V]
        pending = None
        if sampling:
            pending = self._sample(logits, sampling, batch.slot_ids[batch.logits_rows])
        return InFlight(pending, kind, batch.num_tokens, False, t0)

    def _sample(self, logits: torch.Tensor, works: list[SeqWork], slots: torch.Tensor
                ) -> PendingTokens:
        """Sample rows [M, V] for `works` (on `slots` [M]); queue their copy to the host."""
        out = self.sampler.sample_device(logits, works)
        self.last_tokens[slots] = out.tokens
        return PendingTokens.of(out, works)

    def collect(self, step: InFlight) -> StepResult:
        """Wait for a launched step's tokens."""
        tokens = tuple(step.pending.result()) if step.pending is not None else ()
        return StepResult(
            tokens=tokens, kind=step.kind, duration_s=time.perf_counter() - step.started_s,
            num_tokens=step.num_tokens, cuda_graph=step.cuda_graph,
        )

    # ---- one request, for the CLI and tests ---------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams = GREEDY,
        max_new_tokens: int = 16,
        stop_token_ids: tuple[int, ...] | None = None,
        ignore_eos: bool = False,
        slot: int = 0,
    ) -> GenerateOutput:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context of {self.max_context}"
            )
        stops = set(stop_token_ids or ()) | (set() if ignore_eos else set(self.model_config.eos_token_ids))
        penalties = sampling.has_penalties
        out: list[int] = []
        lps: list[float | None] = []
        pos = 0
        feed = list(prompt_ids)
        while True:
            chunk = tuple(feed[: self.max_chunk_tokens])
            feed = feed[len(chunk) :]
            last = not feed
            work = SeqWork(
                slot=slot, token_ids=chunk, start_pos=pos, sample=last, sampling=sampling,
                prompt_token_ids=tuple(prompt_ids) if penalties else (),
                output_token_ids=tuple(out) if penalties else (),
            )
            result = self.step(StepPlan((work,)))
            pos += len(chunk)
            if not last:
                continue
            tok: SampledToken = result.tokens[0]
            out.append(tok.token_id)
            lps.append(tok.logprob)
            if tok.token_id in stops:
                return GenerateOutput(tuple(out), "stop", tuple(lps))
            if len(out) >= max_new_tokens:
                return GenerateOutput(tuple(out), "length", tuple(lps))
            feed = [tok.token_id]
