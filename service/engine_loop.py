"""The engine thread: runs scheduler steps and hands outputs to the asyncio loop.

GPU (or CPU) work never runs on the event loop: this thread runs `Scheduler.step` (which launches
the next engine step and waits for the previous one's tokens, the GIL released), then posts the
RequestOutputs back with `loop.call_soon_threadsafe`, where they land in one asyncio.Queue per
request.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from scheduler.request import FinishReason, Request, RequestOutput
from scheduler.scheduler import Scheduler, StepEngine

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self, engine: StepEngine, scheduler: Scheduler, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self._loop = loop
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}  # event-loop thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    # ---- event-loop side ------------------------------------------------------------------------
    def submit(self, request: Request) -> asyncio.Queue[RequestOutput]:
        """Queue a request; its outputs arrive on the returned queue. Raises like Scheduler.add."""
        if self.failure is not None:
            raise RuntimeError(f"the engine thread has stopped: {self.failure}")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.scheduler.add(request)
        self._queues[request.request_id] = queue
        return queue

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue  # the caller is gone (cancelled before it could read)
            if out.finished:
                del self._queues[out.request_id]
            queue.put_nowait(out)

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.scheduler.wait_for_work(timeout=0.5):
                    continue
                outputs = self.scheduler.step(self.engine)
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # a scheduler bug: fail everyone rather than hang them
            log.exception("engine thread crashed")
            self.failure = exc
            self._loop.call_soon_threadsafe(self._fail_all, f"engine thread crashed: {exc!r}")

    def _fail_all(self, error: str) -> None:
        for rid in list(self._queues):
            self._dispatch([RequestOutput(rid, finish_reason=FinishReason.ERROR, error=error)])

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.scheduler.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
