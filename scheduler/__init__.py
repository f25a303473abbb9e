"""Continuous-batching scheduler over KV-cache slots (pure Python; never touches the GPU)."""

from scheduler.config import DuplicateRequest, QueueFull, SchedulerConfig
from scheduler.request import FinishReason, Request, RequestOutput, StopParams
from scheduler.scheduler import Scheduler

__all__ = [
    "DuplicateRequest", "FinishReason", "QueueFull", "Request", "RequestOutput", "Scheduler",
    "SchedulerConfig", "StopParams",
]
