"""ServerConfig: everything `gptoss-serve serve` needs, validated once (DESIGN §11)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see ServerHandle.port)
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0: pick a free port
    # engine
    model: str | None = None  # checkpoint directory; None = the built-in tiny random model
    random_shape: str | None = None  # instead of a checkpoint: a preset shape, random weights (bench)
    device: str = "cpu"
    dtype: str = "bfloat16"
    max_slots: int = 8
    max_context: int = 2048
    max_chunk_tokens: int = 512
    cuda_graphs: bool = True
    step_graphs: bool = True  # prompt-carrying steps as CUDA graphs too (runtime/step_graphs.py)
    kernels: str = "auto"
    warmup: bool = True
    # scheduling and limits
    max_step_tokens: int = 2048  # tokens per engine step, decode tokens of running requests first
    max_queue: int = 256  # waiting requests beyond the slots; then RESOURCE_EXHAUSTED
    # prefill batching under load (scheduler/config.py): 0 tokens = admit at once
    prefill_batch_tokens: int = 1536
    prefill_max_wait_s: float = 0.25
    overlap_scheduling: bool = True  # plan/launch step n+1 while step n runs (SchedulerConfig)
    max_new_tokens_limit: int | None = None  # None: the context size
    max_request_bytes: int = 4 << 20  # larger requests: INVALID_ARGUMENT (gRPC refuses 2× that)
    grace_period_s: float = 30.0  # SIGTERM: time in-flight requests get to finish
    # security
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    auth_token: str | None = None  # clients must send `authorization: Bearer <token>`

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        for name in ("max_slots", "max_context", "max_chunk_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be ≥ 0, got {self.max_queue}")
        if self.prefill_batch_tokens < 0 or not 0 <= self.prefill_max_wait_s <= 60:
            raise ValueError("prefill_batch_tokens must be ≥ 0 and prefill_max_wait_s in [0, 60]")
        if self.max_step_tokens < self.max_slots:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be ≥ max_slots ({self.max_slots})"
            )
        if self.max_new_tokens_limit is not None and self.max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be ≥ 1, got {self.max_new_tokens_limit}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be ≥ 0, got {self.grace_period_s}")
        if self.random_shape is not None:
            from runtime.config import PRESETS  # plain data, no torch

            if self.model is not None:
                raise ValueError("give a model or a random shape, not both")
            if self.random_shape not in PRESETS:
                raise ValueError(
                    f"unknown shape {self.random_shape!r}; choose one of {sorted(PRESETS)}"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
