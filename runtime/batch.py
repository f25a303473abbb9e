"""A StepPlan turned into the tensors one forward pass reads (packed, ragged)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.types import StepPlan


@dataclass
class Batch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_ids: torch.Tensor  # [T] int64
    cu_seqlens: list[int]  # [N+1] query row offsets per sequence
    seq_slots: list[int]  # [N]
    seq_start_pos: list[int]  # [N]
    logits_rows: torch.Tensor  # [M] rows of T whose next token is sampled
    decode_only: bool  # every sequence feeds exactly one token
    # Leading one-token sequences (the scheduler puts decodes first): a mixed step runs their
    # attention with the decode kernel, the rest with the prefill kernel.
    decode_rows: int = 0
    # What a backend derives from the batch once per step and reuses in every layer (e.g. the
    # prefill attention's tile table per layer kind), keyed by the backend.
    derived: dict[Any, Any] = field(default_factory=dict)
    # A CUDA-graph step (runtime/step_graphs.py): the prefill kernel's tile table for every row,
    # already checked against both cache kinds and padded with empty tiles to a fixed size;
    # the Triton backend then runs all rows' attention through it and reads no host list.
    tile_table: torch.Tensor | None = None  # [tiles, 4] int32

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as a device tensor without stalling the host: staged in pinned memory on
    CUDA, so the copy is queued behind the GPU's work instead of waiting for it."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def build_batch(plan: StepPlan, device: torch.device | str) -> Batch:
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    rows: list[int] = []
    for w in plan.work:
        n = len(w.token_ids)
        tokens.extend(w.token_ids)
        positions.extend(range(w.start_pos, w.start_pos + n))
        slots.extend([w.slot] * n)
        cu.append(cu[-1] + n)
        if w.sample:
            rows.append(cu[-1] - 1)

    def as_tensor(values: list[int]) -> torch.Tensor:
        return to_device(values, torch.long, device)

    return Batch(
        token_ids=as_tensor(tokens),
        positions=as_tensor(positions),
        slot_ids=as_tensor(slots),
        cu_seqlens=cu,
        seq_slots=[w.slot for w in plan.work],
        seq_start_pos=[w.start_pos for w in plan.work],
        logits_rows=as_tensor(rows),
        decode_only=plan.is_decode_only,
        decode_rows=_leading_single_tokens(plan),
    )


def _leading_single_tokens(plan: StepPlan) -> int:
    n = 0
    for w in plan.work:
        if len(w.token_ids) != 1:
            break
        n += 1
    return n
