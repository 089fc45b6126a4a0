"""Turning sampled token ids into the text a client sees: UTF-8 safe, stop sequences held back.

Both classes are pure and synchronous; the generation loop feeds them one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

# How many tokens before the new ones are decoded with them, so that tokenizers which
# drop a leading space or merge across token boundaries still give the right new text.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decode a growing token sequence and hand out only the text that is final.

    Each step decodes a short window ``ids[prefix:]`` and compares it with the decode of
    ``ids[prefix:read]`` (the text already handed out from that window); the difference is
    new. Text that ends in U+FFFD is an incomplete multi-byte character and is held back
    until a later token completes it, so a character is never split across two pieces.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new stable text (often ``""`` while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), even an incomplete character."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


class StopMatcher:
    """Find stop sequences in streamed text without ever emitting any part of one.

    ``feed`` returns the text that is safe to emit and, once a stop sequence appears, which one.
    Text that could be the start of a stop sequence is held back until it is known not to be.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        self._pending += text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._pending.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.matched = first[1]
            out, self._pending = self._pending[: first[0]], ""
            return out
        keep = self._held_back_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """At the end of generation, the held-back text is not a stop: release it."""
        out, self._pending = self._pending, ""
        return "" if self.matched is not None else out

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
