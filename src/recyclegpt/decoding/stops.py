"""Where a row ends: EOS ids, stop strings (needs something with `decode(ids) -> str`), a callback.

`StopChecker.scan` looks at each newly appended token in order, so a stop inside an accepted
draft ends the row at that token and nothing after it is kept.
- EOS: the row ends before the EOS token (EOS is not part of the output tokens).
- stop string: the row ends after the token that completes the string (tokens cannot be cut);
  `trim_at_stop` removes the string and what follows from the decoded text (OpenAI style).
- callback `stop_fn(row, generated_ids) -> bool`: called with each candidate prefix; True ends
  the row after its last token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..errors import RecycleError


class Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


StopFn = Callable[[int, Sequence[int]], bool]


class StopChecker:
    def __init__(self, eos_ids: Iterable[int] = (), stop_strings: Sequence[str] = (),
                 tokenizer: Decodes | None = None, stop_fn: StopFn | None = None):
        self.eos_ids = frozenset(eos_ids)
        self.stop_strings = tuple(s for s in stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise RecycleError("stop strings must be non-empty strings")
        if self.stop_strings and tokenizer is None:
            raise RecycleError("stop strings need a tokenizer (pass tokenizer=...) or use a stop callback")
        self.tokenizer = tokenizer
        self.stop_fn = stop_fn
        # A stop string of B bytes lies within the last B tokens that end it (every token has
        # >= 1 byte); two more tokens of margin for byte-level partial characters.
        self.window = max((len(s.encode()) for s in self.stop_strings), default=0) + 2

    @property
    def trivial(self) -> bool:
        return not self.eos_ids and not self.stop_strings and self.stop_fn is None

    def scan(self, row: int, generated: Sequence[int], start: int) -> tuple[int, str | None]:
        """Tokens generated[start:] are new. Returns (tokens to keep, 'eos' | 'stop' | None)."""
        if self.trivial:
            return len(generated), None
        for j in range(start, len(generated)):
            if generated[j] in self.eos_ids:
                return j, "eos"
            if self.stop_strings:
                text = self.tokenizer.decode(list(generated[max(0, j + 1 - self.window):j + 1]))
                if any(s in text for s in self.stop_strings):
                    return j + 1, "stop"
            if self.stop_fn is not None and self.stop_fn(row, generated[:j + 1]):
                return j + 1, "stop"
        return len(generated), None


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut text at the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]
