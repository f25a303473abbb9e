"""Continuous-batching scheduler: FIFO admission, chunked prefill, decode batching, stops, aborts.

Each step the plan first carries one decode token for every running request (so long prompts never
stall streams), then continues partial prefills, then admits waiting requests into free slots, all
under a per-step token budget. `add` and `abort` may be called from any thread; everything else runs
on the one engine thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from runtime.types import SampledToken, SeqWork, StepPlan, StepResult
from scheduler.config import DuplicateRequest, QueueFull, SchedulerConfig, StepEngine
from scheduler.request import FinishReason, Request, RequestOutput, RequestState
from scheduler.slots import SlotTable
from scheduler.stats import GaugeStats, NullSink, RequestStats, StatsSink, StepStats
from scheduler.text import IncrementalText

log = logging.getLogger(__name__)

__all__ = ["DuplicateRequest", "QueueFull", "Scheduler", "SchedulerConfig", "StepEngine"]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        decode: Callable[[Sequence[int]], str] | None = None,
        sink: StatsSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.slots = SlotTable(config.max_slots)
        self._decode = decode
        self._sink = sink or NullSink()
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # guards the inbox, the abort set and the live map
        self._wakeup = threading.Condition(self._lock)  # the engine thread sleeps on it when idle
        self._inbox: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._live: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()  # engine thread only
        self._running: list[Request] = []  # admitted (prefilling or running), admission order
        self._texts: dict[str, IncrementalText] = {}
        self._eos = frozenset(config.eos_token_ids)

    # ---- any thread ----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raises QueueFull or DuplicateRequest."""
        if len(request.prompt_ids) >= self.config.max_context:
            raise ValueError(
                f"prompt has {len(request.prompt_ids)} tokens; the context holds "
                f"{self.config.max_context} (prompt + at least one new token)"
            )
        with self._lock:
            if request.request_id in self._live:
                raise DuplicateRequest(f"request_id {request.request_id!r} is already in flight")
            if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"waiting queue is full ({self.config.max_queue} requests)")
            if not request.arrival_s:
                request.arrival_s = self._clock()
            self._live[request.request_id] = request
            self._inbox.append(request)
            self._wakeup.notify_all()

    def abort(self, request_id: str) -> bool:
        """Ask to abort; it takes effect (slot freed, ABORTED emitted) at the next step."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._aborts.add(request_id)
            self._wakeup.notify_all()
            return True

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    def has_work(self) -> bool:
        with self._lock:
            return self._has_work()

    def _has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._waiting or self._running)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to do (or `timeout`, or `wake()`); True if there is."""
        with self._wakeup:
            if not self._has_work():
                self._wakeup.wait(timeout)
            return self._has_work()

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    # ---- engine thread -------------------------------------------------------------------------
    def step(self, engine: StepEngine) -> list[RequestOutput]:
        """One scheduling round: take new requests and aborts, run one engine step, emit deltas."""
        t0 = time.perf_counter()
        outputs = self._take_inbox()
        plan, hits = self.schedule()
        if plan is not None:
            t1 = time.perf_counter()
            try:
                result = engine.step(plan)
            except Exception as exc:  # the engine's state for these rows is unknown: fail them
                log.exception("engine step failed; failing %d requests", len(plan.work))
                outputs += self._fail(plan, f"engine step failed: {type(exc).__name__}: {exc}")
            else:
                t2 = time.perf_counter()
                outputs += self.update(plan, result, hits,
                                       before_s=(t1 - t0), started_s=t2)
        self._sink.on_gauges(self.gauges())
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        outputs: list[RequestOutput] = []
        for request_id in aborts:
            req = self._live.get(request_id)
            if req is not None and not req.is_finished:
                if req in self._waiting:
                    self._waiting.remove(req)
                outputs.append(self._finish(req, FinishReason.ABORTED))
        return outputs

    def schedule(self) -> tuple[StepPlan | None, int]:
        """Build the next StepPlan (None when idle) and the prefix-hit tokens of new admissions."""
        budget = self.config.max_step_tokens
        work: list[SeqWork] = []
        for req in self._running:  # decode tokens first: one per running request
            if req.output_ids:
                work.append(self._work(req, 1))
                budget -= 1
        for req in self._running:  # then continue partial prefills, oldest first
            if not req.output_ids and budget > 0:
                chunk = min(len(req.prompt_ids) - req.num_fed, self.config.max_chunk_tokens, budget)
                work.append(self._work(req, chunk))
                budget -= chunk
        hits = 0
        decoding = sum(1 for req in self._running if req.output_ids)
        chunked = len(work) > decoding  # a prompt chunk already makes this an eager step
        if self._waiting and not chunked and not self._admission_due(budget, decoding):
            return (StepPlan(tuple(work)) if work else None), hits
        while self._waiting and budget > 0 and self.slots.num_free:
            req = self._waiting.popleft()
            hits += self._admit(req)
            chunk = min(len(req.prompt_ids) - req.num_fed, self.config.max_chunk_tokens, budget)
            work.append(self._work(req, chunk))
            budget -= chunk
        return (StepPlan(tuple(work)) if work else None), hits

    def _admission_due(self, budget: int, decoding: int) -> bool:
        """Whether this step admits waiting requests (SchedulerConfig: prefill batching)."""
        cfg = self.config
        if (cfg.prefill_batch_tokens == 0 or decoding == 0
                or decoding < cfg.prefill_batch_min_running):
            return True  # (nothing decoding: holding back would leave the step empty)
        if self._clock() - self._waiting[0].arrival_s >= cfg.prefill_max_wait_s:
            return True
        want, pending = min(cfg.prefill_batch_tokens, budget), 0
        for req in self._waiting:
            pending += len(req.prompt_ids)
            if pending >= want:
                return True
        return False

    def _admit(self, req: Request) -> int:
        slot, reused = self.slots.acquire(
            req.request_id, req.prompt_ids, self.config.prefix_reuse_slack
        )
        req.slot, req.num_fed, req.cached_tokens = slot, reused, reused
        req.state = RequestState.PREFILLING
        req.admitted_s = self._clock()
        if req.random_seed:
            req.sampling = replace(req.sampling, seed=self._rng.getrandbits(63))
        if self._decode is not None:
            self._texts[req.request_id] = IncrementalText(self._decode, req.stop.stop)
        self._running.append(req)
        return reused

    def _work(self, req: Request, n: int) -> SeqWork:
        start = req.num_fed
        penalties = req.sampling.has_penalties
        return SeqWork(
            slot=req.slot,  # type: ignore[arg-type]
            token_ids=req.tokens(start, start + n),
            start_pos=start,
            sample=start + n == req.num_tokens,
            sampling=req.sampling,
            prompt_token_ids=req.prompt_ids if penalties else (),
            output_token_ids=tuple(req.output_ids) if penalties else (),
        )

    def update(self, plan: StepPlan, result: StepResult, hits: int = 0, before_s: float = 0.0,
               started_s: float | None = None) -> list[RequestOutput]:
        """Apply an engine step's result: advance positions, append tokens, check stops.
        before_s: the round's host time before Engine.step; started_s: perf_counter() when it
        returned (the host time of this update is added to the step's scheduler_s)."""
        sampled = iter(result.tokens)
        outputs: list[RequestOutput] = []
        now = self._clock()
        ttft: list[float] = []
        itl: list[float] = []
        prompt_tokens = generated = 0
        by_slot = {req.slot: req for req in self._running}
        for w in plan.work:
            req = by_slot[w.slot]
            self.slots.record(w.slot, w.start_pos, w.token_ids)
            req.num_fed = w.end_pos
            if not req.output_ids:
                prompt_tokens += len(w.token_ids)
            if not w.sample:
                continue
            token = next(sampled)
            if token.slot != w.slot:
                raise RuntimeError(f"engine returned slot {token.slot} for slot {w.slot}")
            generated += 1
            if req.first_token_s is None:
                req.first_token_s = now
                req.state = RequestState.RUNNING
                ttft.append(now - req.arrival_s)
            else:
                itl.append(now - (req.last_token_s or now))
            req.last_token_s = now
            outputs.append(self._on_token(req, token))
        self._sink.on_step(
            StepStats(
                kind=result.kind, duration_s=result.duration_s, batch_size=len(plan.work),
                num_tokens=plan.num_tokens, cuda_graph=result.cuda_graph,
                prompt_tokens=prompt_tokens, generated_tokens=generated, prefix_hit_tokens=hits,
                ttft_s=tuple(ttft), inter_token_s=tuple(itl),
                scheduler_s=before_s + (time.perf_counter() - started_s
                                        if started_s is not None else 0.0),
            )
        )
        return outputs

    def _on_token(self, req: Request, token: SampledToken) -> RequestOutput:
        req.output_ids.append(token.token_id)
        n_out = len(req.output_ids)
        stop = req.stop
        may_stop = n_out >= stop.min_new_tokens
        logprobs = (token,) if req.sampling.logprobs or req.sampling.top_logprobs else ()
        text = self._texts.get(req.request_id)
        reason: FinishReason | None = None
        delta = ""
        is_eos = token.token_id in self._eos and not stop.ignore_eos
        if may_stop and (is_eos or token.token_id in stop.stop_token_ids):
            reason = FinishReason.STOP  # the stop token's own text is not part of the output
        else:
            if text is not None:
                delta = text.push(token.token_id, check_stop=may_stop)
                if text.stopped_by is not None:
                    reason = FinishReason.STOP_SEQUENCE
            if reason is None and (
                (stop.max_new_tokens is not None and n_out >= stop.max_new_tokens)
                or req.num_tokens >= self.config.max_context
            ):
                reason = FinishReason.LENGTH
        if reason is None:
            return RequestOutput(req.request_id, (token.token_id,), delta, logprobs)
        last = self._finish(req, reason)
        return replace(last, token_ids=(token.token_id,), text=delta + last.text, logprobs=logprobs)

    def _finish(self, req: Request, reason: FinishReason, error: str | None = None) -> RequestOutput:
        """Free the request's slot (keeping its cache rows for prefix reuse) and say goodbye."""
        text = self._texts.pop(req.request_id, None)
        tail = text.flush() if text is not None and reason is not FinishReason.STOP_SEQUENCE else ""
        if req.slot is not None and req in self._running:
            self._running.remove(req)
            self.slots.release(req.slot, keep_contents=error is None)
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        with self._lock:
            self._live.pop(req.request_id, None)
        now = self._clock()
        self._sink.on_request_done(
            RequestStats(
                request_id=req.request_id, finish_reason=reason.value,
                prompt_tokens=len(req.prompt_ids), generation_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                queue_s=None if req.admitted_s is None else req.admitted_s - req.arrival_s,
                e2e_s=now - req.arrival_s,
            )
        )
        return RequestOutput(
            req.request_id, text=tail, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens, error=error,
        )

    def _fail(self, plan: StepPlan, error: str) -> list[RequestOutput]:
        slots = {w.slot for w in plan.work}
        failed = [req for req in self._running if req.slot in slots]
        return [self._finish(req, FinishReason.ERROR, error) for req in failed]

    def abort_all(self) -> None:
        """Abort every request in flight (server shutdown after the grace period)."""
        with self._lock:
            self._aborts.update(self._live)
            self._wakeup.notify_all()

    def gauges(self) -> GaugeStats:
        capacity = self.config.max_slots * self.config.max_context
        return GaugeStats(
            num_running=len(self._running),
            num_waiting=self.num_waiting,
            slots_used=self.slots.num_used,
            kv_cache_usage_ratio=self.slots.used_tokens() / capacity,
        )
