"""Incremental detokenisation with stop strings, shared by the backends.

Text is re-decoded from all output tokens (byte-level BPE may need several tokens for one
character) and only the new, settled part is emitted; a tail that could still grow into a stop
string is held back, so a streamed answer never shows half a stop sequence.
"""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Turns output token ids into text deltas and detects stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens and returns the new text that is safe to show."""
        self.ids += token_ids
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at])
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(text[: len(text) - hold])

    def flush(self) -> str:
        """The held-back tail once the request ends without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self.decode(self.ids))

    def _emit(self, upto: str) -> str:
        if len(upto) <= self.emitted:
            return ""
        delta = upto[self.emitted :]
        self.emitted = len(upto)
        return delta
