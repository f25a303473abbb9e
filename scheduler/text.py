"""Incremental detokenization with stop strings.

Text is decoded from a growing window of token ids (the window restarts at the last point where the
decoded text ended on a whole character), so a multi-byte UTF-8 character split over several tokens
is emitted once complete: a trailing U+FFFD means "wait for more bytes". Text whose tail could be the
beginning of a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Turns tokens into text deltas; finds stop strings across token boundaries."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # window start: a clean character boundary
        self._read = 0  # ids before this were already turned into text
        self._held = ""  # decoded text not emitted yet (may start a stop string)
        self.stopped_by: str | None = None

    def push(self, token_id: int, check_stop: bool = True) -> str:
        """Add one token; return the text that is now safe to emit.

        After a stop string is found, `stopped_by` is set and the returned text ends just before it.
        With check_stop False (before min_new_tokens), stop strings are not matched yet.
        """
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for its other bytes
        self._held += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(check_stop)

    def flush(self) -> str:
        """At the end: everything still pending, partial characters included."""
        tail = ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            tail = self._decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._prefix = self._read = len(self._ids)
        text, self._held = self._held + tail, ""
        return text

    def _release(self, check_stop: bool) -> str:
        buf = self._held
        if check_stop and self._stop:
            hits = [(i, s) for s in self._stop if (i := buf.find(s)) >= 0]
            if hits:
                index, stop = min(hits)
                self.stopped_by = stop
                self._held = ""
                return buf[:index]
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
