"""SlotTable: which request owns which KV-cache row, and what each row still holds.

Slots 0 … max_slots-1 are rows of the engine's KV cache; the engine keeps one more, dummy row
(index `max_slots`) to pad CUDA-graph batches, never handed out here. A row keeps its contents after
its request ends, so a new prompt that shares a prefix with a free row's tokens can start there and
skip that part of prefill (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    def __init__(self, max_slots: int) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be ≥ 1, got {max_slots}")
        self.max_slots = max_slots
        self.dummy_slot = max_slots
        self._owner: list[str | None] = [None] * max_slots
        self._tokens: list[list[int]] = [[] for _ in range(max_slots)]  # fed tokens, by position
        self._released_at: list[int] = [0] * max_slots  # for least-recently-used eviction
        self._clock = 0

    @property
    def num_used(self) -> int:
        return sum(owner is not None for owner in self._owner)

    @property
    def num_free(self) -> int:
        return self.max_slots - self.num_used

    def owner(self, slot: int) -> str | None:
        return self._owner[slot]

    def cached_tokens(self, slot: int) -> tuple[int, ...]:
        return tuple(self._tokens[slot])

    def used_tokens(self) -> int:
        """Tokens held by rows that belong to running requests."""
        return sum(len(t) for t, o in zip(self._tokens, self._owner, strict=True) if o is not None)

    def reusable_prefix(self, slot: int, prompt: Sequence[int], slack: int) -> int:
        """Prompt tokens the free row `slot` can skip: the common prefix p, when usable.

        At least one prompt token must still be fed (to get logits), and sliding-window layers are
        ring buffers, so the row may hold at most `slack` tokens beyond p (else the window before p
        was overwritten).
        """
        held = self._tokens[slot]
        p = min(common_prefix_len(held, prompt), len(prompt) - 1)
        if p <= 0 or len(held) - p > slack:
            return 0
        return p

    def acquire(self, request_id: str, prompt: Sequence[int], slack: int) -> tuple[int, int]:
        """Give a free row to `request_id`: (slot, prompt tokens reused from its contents).

        Prefers the longest reusable prefix; otherwise an empty row, then the least recently
        released one (its cached prefix is the least likely to be wanted again).
        """
        free = [s for s in range(self.max_slots) if self._owner[s] is None]
        if not free:
            raise RuntimeError("no free slot")
        best = max(free, key=lambda s: (self.reusable_prefix(s, prompt, slack), -self._rank(s)))
        reused = self.reusable_prefix(best, prompt, slack)
        self._owner[best] = request_id
        del self._tokens[best][reused:]
        return best, reused

    def _rank(self, slot: int) -> int:
        # Empty rows first, then the oldest released.
        return -1 if not self._tokens[slot] else self._released_at[slot]

    def record(self, slot: int, start_pos: int, token_ids: Sequence[int]) -> None:
        """The engine fed `token_ids` at positions start_pos … into row `slot`."""
        held = self._tokens[slot]
        if start_pos > len(held):
            raise ValueError(f"slot {slot}: write at {start_pos} leaves a gap after {len(held)}")
        del held[start_pos:]
        held.extend(token_ids)

    def release(self, slot: int, keep_contents: bool = True) -> None:
        if self._owner[slot] is None:
            raise ValueError(f"slot {slot} is not in use")
        self._owner[slot] = None
        self._clock += 1
        self._released_at[slot] = self._clock
        if not keep_contents:
            self._tokens[slot].clear()

    def forget(self, slot: int) -> None:
        """A free row whose contents are unknown (a failed step wrote it): nothing to reuse."""
        if self._owner[slot] is not None:
            raise ValueError(f"slot {slot} is in use")
        self._tokens[slot].clear()
