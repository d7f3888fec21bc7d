"""Token ids to streamed text: incremental UTF-8, stop strings cut, nothing sent that a stop takes back."""

from __future__ import annotations

import codecs


class TextStream:
    """Text of one request's new tokens, handed out piece by piece.

    A character split over several tokens is emitted once whole. With stop strings, the last
    len(longest stop) - 1 characters are held back until the next token shows they do not begin a stop.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.emitted = "", 0

    def add(self, token_id: int | None, final: bool) -> tuple[str, bool]:
        """Append a token (None: only flush) -> (text to emit now, whether a stop string ended the output)."""
        if self.tokenizer is None:
            return "", False
        before = len(self.text)
        if token_id is not None:
            self.text += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        if final:
            self.text += self.decoder.decode(b"", final=True)
        stopped = self._cut_stop(before)
        end = len(self.text) if final or stopped else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece, stopped

    def _cut_stop(self, before: int) -> bool:
        """Cut the text at the earliest stop string that ends in the newly added part."""
        if not self.stop or len(self.text) == before:
            return False
        first = max(0, before - self.hold)
        hits = [i for i in (self.text.find(s, first) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True
