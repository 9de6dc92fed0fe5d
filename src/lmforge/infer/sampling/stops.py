"""Stop strings, for `generate()` and the engine alike: incremental detokenization of one sequence that finds a stop
string across token boundaries and never shows part of one."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopText"]


class StopText:
    """Incremental detokenization of one row, with stop strings found across token boundaries.

    Text that could still become a stop string is held back, so a streamed piece never shows part of a stop string.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0  # chars of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text now safe to show, whether a stop string completed)."""
        before = len(self.text)
        self.text += self.decoder.step(token_id)
        hits = [at for s in self.stops if (at := self.text.find(s, max(0, before - len(s) + 1))) != -1]
        if hits:  # the earliest in the text wins, whatever the order of the stop strings
            self.text = self.text[:min(hits)]
            return self.flush(), True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.emitted:len(self.text) - held]
        self.emitted += len(piece)
        return piece, False

    def flush(self) -> str:
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
