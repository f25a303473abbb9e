"""Continuous-batching scheduler: FIFO admission, chunked prefill, decode batching, stops, aborts.

Each step the plan first carries one decode token for every running request (so long prompts never
stall streams), then continues partial prefills, then admits waiting requests into free slots, all
under a per-step token budget. `add` and `abort` may be called from any thread; everything else runs
on the one engine thread.

Overlapped scheduling (SchedulerConfig.overlap, engines with launch/collect): each round plans and
launches step n+1, then reads step n's tokens. Step n+1 is planned as if every request in step n
goes on; its decode rows for tokens still being sampled carry PREVIOUS_TOKEN. A request that step
n's token stops gets one dropped row in step n+1; the KV entry that row writes is recorded as the
slot's contents (it is the stop token at the next position: true content, not junk), so prefix
reuse stays exact.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from runtime.types import PREVIOUS_TOKEN, SampledToken, SeqWork, StepPlan, StepResult
from scheduler.config import DuplicateRequest, QueueFull, SchedulerConfig, StepEngine
from scheduler.request import FinishReason, Request, RequestOutput, RequestState
from scheduler.slots import SlotTable
from scheduler.stats import GaugeStats, NullSink, RequestStats, StatsSink, StepStats
from scheduler.text import IncrementalText

log = logging.getLogger(__name__)

__all__ = ["DuplicateRequest", "QueueFull", "Scheduler", "SchedulerConfig", "StepEngine"]


@dataclass
class _Launched:
    """A step the engine is running: its plan, the request behind each row, the engine's
    handle, and host times for its StepStats."""

    plan: StepPlan
    reqs: list[Request]  # reqs[i] owns plan.work[i]
    handle: object
    hits: int
    before_s: float  # the round's host time before the engine was called


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
        self._in_flight: _Launched | None = None  # launched, tokens not read yet

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
        return bool(self._inbox or self._aborts or self._waiting or self._running
                    or self._in_flight is not None)

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
        """One scheduling round: take new requests and aborts, launch a step, emit deltas.

        Sequential: plan, run, read the tokens. Overlapped (config.overlap and an engine with
        launch/collect): plan and launch the next step first, then read the tokens of the one
        launched in the previous round, which ran on the GPU while this round's host work did.
        """
        t0 = time.perf_counter()
        overlap = self.config.overlap and callable(getattr(engine, "launch", None))
        outputs = self._take_inbox()
        if self._in_flight is not None and not self._can_plan_ahead():
            outputs += self._collect(engine)
        plan, reqs, hits = self.schedule()
        launched = None
        if plan is not None:
            t1 = time.perf_counter()
            try:
                handle = engine.launch(plan) if overlap else engine.step(plan)
            except Exception as exc:  # the engine's state for these rows is unknown: fail them
                log.exception("engine step failed; failing %d requests", len(plan.work))
                outputs += self._fail(reqs, f"engine step failed: {type(exc).__name__}: {exc}")
            else:
                for w, req in zip(plan.work, reqs, strict=True):
                    req.num_scheduled = w.end_pos
                    req.pending_samples += w.sample
                launched = _Launched(plan, reqs, handle, hits, t1 - t0)
        if self._in_flight is not None:
            outputs += self._collect(engine)
        self._in_flight = launched
        if launched is not None and not overlap:
            outputs += self._collect(engine, ran=True)
        self._sink.on_gauges(self.gauges())
        return outputs

    def _can_plan_ahead(self) -> bool:
        """Whether the next plan may be made before the step in flight is read: not when a
        running request's penalties need its latest token on the host."""
        return not any(r.sampling.has_penalties and r.pending_samples for r in self._running)

    def _collect(self, engine: StepEngine, ran: bool = False) -> list[RequestOutput]:
        """Read the step in flight's tokens and apply them (`ran`: engine.step already did)."""
        step, self._in_flight = self._in_flight, None
        assert step is not None
        try:
            result = step.handle if ran else engine.collect(step.handle)  # type: ignore[attr-defined]
        except Exception as exc:
            log.exception("engine step failed; failing %d requests", len(step.plan.work))
            self._forget_slots(step)
            return self._fail(step.reqs, f"engine step failed: {type(exc).__name__}: {exc}")
        t2 = time.perf_counter()
        return self.update(step.plan, step.reqs, result, step.hits, step.before_s, t2)

    def _forget_slots(self, step: _Launched) -> None:
        """A failed step's rows hold unknown cache contents: free rows must not be reused."""
        for w in step.plan.work:
            if self.slots.owner(w.slot) is None:
                self.slots.forget(w.slot)

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

    def schedule(self) -> tuple[StepPlan | None, list[Request], int]:
        """Build the next StepPlan (None when idle), the request behind each row, and the
        prefix-hit tokens of new admissions. Positions count what is in flight as fed."""
        budget = self.config.max_step_tokens
        work: list[SeqWork] = []
        reqs: list[Request] = []
        decoding = 0
        for req in self._running:  # decode tokens first: one per running request
            if req.num_scheduled >= len(req.prompt_ids):
                decoding += 1
                if not self._done_after_in_flight(req):
                    work.append(self._work(req, 1))
                    reqs.append(req)
                    budget -= 1
        for req in self._running:  # then continue partial prefills, oldest first
            if req.num_scheduled < len(req.prompt_ids) and budget > 0:
                chunk = min(len(req.prompt_ids) - req.num_scheduled, self.config.max_chunk_tokens,
                            budget)
                work.append(self._work(req, chunk))
                reqs.append(req)
                budget -= chunk
        hits = 0
        chunked = len(work) > decoding  # a prompt chunk already makes this an eager step
        if self._waiting and not chunked and not self._admission_due(budget, decoding):
            return (StepPlan(tuple(work)) if work else None), reqs, hits
        while self._waiting and budget > 0 and self.slots.num_free:
            req = self._waiting.popleft()
            hits += self._admit(req)
            chunk = min(len(req.prompt_ids) - req.num_scheduled, self.config.max_chunk_tokens,
                        budget)
            work.append(self._work(req, chunk))
            reqs.append(req)
            budget -= chunk
        return (StepPlan(tuple(work)) if work else None), reqs, hits

    def _done_after_in_flight(self, req: Request) -> bool:
        """Whether the token in flight ends the request by length (so no row for it now)."""
        if not req.pending_samples:
            return False
        n_out = len(req.output_ids) + req.pending_samples
        limit = req.stop.max_new_tokens
        return ((limit is not None and n_out >= limit)
                or req.num_tokens + req.pending_samples >= self.config.max_context)

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
        req.num_scheduled = reused
        req.state = RequestState.PREFILLING
        req.admitted_s = self._clock()
        if req.random_seed:
            req.sampling = replace(req.sampling, seed=self._rng.getrandbits(63))
        if self._decode is not None:
            self._texts[req.request_id] = IncrementalText(self._decode, req.stop.stop)
        self._running.append(req)
        return reused

    def _work(self, req: Request, n: int) -> SeqWork:
        start = req.num_scheduled
        penalties = req.sampling.has_penalties
        # at `start` == num_tokens: the token the step in flight samples
        tokens = req.tokens(start, start + n) if start < req.num_tokens else (PREVIOUS_TOKEN,)
        return SeqWork(
            slot=req.slot,  # type: ignore[arg-type]
            token_ids=tokens,
            start_pos=start,
            sample=start + n >= len(req.prompt_ids),
            sampling=req.sampling,
            prompt_token_ids=req.prompt_ids if penalties else (),
            output_token_ids=tuple(req.output_ids) if penalties else (),
        )

    def update(self, plan: StepPlan, reqs: list[Request], result: StepResult, hits: int,
               before_s: float, started_s: float) -> list[RequestOutput]:
        """Apply an engine step's result: advance positions, append tokens, check stops.
        reqs: the request behind each row; rows of requests that finished meanwhile are
        dropped. before_s: the round's host time before the step was launched; started_s:
        perf_counter() when its tokens were read (the host time of this update is added to the
        step's scheduler_s)."""
        sampled = iter(result.tokens)
        outputs: list[RequestOutput] = []
        now = self._clock()
        ttft: list[float] = []
        itl: list[float] = []
        prompt_tokens = generated = 0
        for w, req in zip(plan.work, reqs, strict=True):
            token = next(sampled) if w.sample else None
            if token is not None and token.slot != w.slot:
                raise RuntimeError(f"engine returned slot {token.slot} for slot {w.slot}")
            if req.is_finished:
                continue  # stopped or aborted while this step ran: its row is dropped
            if not req.output_ids:
                prompt_tokens += len(w.token_ids)
            self.slots.record(w.slot, w.start_pos, req.tokens(w.start_pos, w.end_pos))
            req.num_fed = w.end_pos
            if token is None:
                continue
            req.pending_samples -= 1
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
                scheduler_s=before_s + (time.perf_counter() - started_s),
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
            if error is None and req.num_scheduled > req.num_fed:
                # The step in flight writes these positions (the token that stopped the request
                # at the next one, or a prompt chunk): known tokens, so the row keeps them.
                self.slots.record(req.slot, req.num_fed,
                                  req.tokens(req.num_fed, req.num_scheduled))
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

    def _fail(self, reqs: list[Request], error: str) -> list[RequestOutput]:
        failed = [req for req in dict.fromkeys(reqs) if not req.is_finished]
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
