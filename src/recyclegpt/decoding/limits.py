"""What one decoding request may ask for: one table, checked the same way everywhere.

The Python API (`GenerationConfig.validate`), the command line (its argparse types) and the server
(a 400 answer) all check a request's settings against `SETTINGS` and its text with `check_text`, so
a value is accepted or refused alike on every surface; only the name in the message differs
(`top_p`, `--top-p`). Each range is what the engine can hold, not a guess at what is useful:

- integers that become tensor entries (`top_k`) fit int64; `seed` is a signed 64-bit integer (as
  vLLM takes it) and every request's generator is seeded from it by `request_seed`;
- floats that become float32 tensor entries (`temperature`) are finite in float32;
- draft counts and tree sizes are bounded by what one round's graph may hold.

`InvalidSetting` carries the name it was checked under, so the server can answer with OpenAI's
`param`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import RecycleError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_STOPS = 4  # stop strings per request (OpenAI's limit; a stop string is checked after every token)


class InvalidSetting(RecycleError):
    """A request setting or text outside what the engine accepts; `name` is the name it was given under
    (`top_p`, `--top-p`, `stop[1]`)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Setting:
    """A numeric request setting: its kind and closed/open bounds (None: unbounded on that side)."""

    name: str  # GenerationConfig's field
    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False  # None is allowed (and means "not set")
    words: tuple[str, ...] = ()  # strings accepted as they are (tree: "auto")

    @property
    def allowed(self) -> str:
        """The range in words: 'an integer in [1, 64]', 'a number in (0, 1]', 'an integer >= 0'."""
        what = "an integer" if self.kind is int else "a number"
        lo, hi = _show(self.lo), _show(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        return f"a finite {'integer' if self.kind is int else 'number'}"

    @property
    def accepted(self) -> str:
        """`allowed` with the accepted words: 'an integer in [0, 256] or 'auto''."""
        return self.allowed + "".join(f" or {w!r}" for w in self.words)

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused ('must be ..., got ...'), or None when it is accepted."""
        if (value is None and self.optional) or (isinstance(value, str) and value in self.words):
            return None
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            return f"must be {self.accepted}{' or null' if self.optional else ''}, got {_shown(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.accepted} (finite), got {_shown(value)}"
        lo, hi = self.lo, self.hi
        if (lo is not None and (value <= lo if self.lo_open else value < lo)) or \
                (hi is not None and (value >= hi if self.hi_open else value > hi)):
            return f"must be {self.accepted}, got {_shown(value)}"
        return None

    def check(self, value: Any, name: str | None = None) -> Any:
        """`value` when accepted; InvalidSetting naming `name` (default: the field) otherwise."""
        why = self.problem(value)
        if why is not None:
            name = name or self.name
            raise InvalidSetting(name, f"{name} {why}")
        return value


def _show(x: float | None) -> str:
    if x is None:
        return ""
    if x == INT64_MAX:
        return "2^63-1"
    if x == INT64_MIN:
        return "-2^63"
    if x == FLOAT32_MAX:
        return "3.4e38"
    return f"{x:g}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("max_new_tokens", int, 0),  # 0: nothing new; the model's context caps it
    Setting("temperature", float, 0, FLOAT32_MAX),  # 0: greedy
    Setting("top_k", int, 0, INT64_MAX),  # 0: off
    Setting("top_p", float, 0, 1, lo_open=True),  # 1: off
    Setting("seed", int, INT64_MIN, INT64_MAX, optional=True),  # None: fresh randomness
    Setting("k", int, 1, 64),  # drafts per verify round
    Setting("k_max", int, 1, 64),  # adaptive k's ceiling
    Setting("ngram_k", int, 1, 64, optional=True),  # None: k
    Setting("ngram_max_n", int, 1, 64),
    Setting("ngram_min_n", int, 1, 64, optional=True),
    Setting("tree", int, 0, 256, words=("auto",)),  # 0: a chain of k drafts; auto: measure and pick
    Setting("tree_topk", int, 1, 16),
)}


def request_seed(seed: int) -> int:
    """The seed a request's generator takes for an accepted `seed`: torch's generators take [0, 2^64)."""
    return seed % (1 << 64)


def text_problem(text: str) -> str | None:
    """Why a string is refused ('is not valid Unicode text ...'), or None. Lone surrogates (JSON's "\\ud800",
    or bytes that were not UTF-8, as Python's surrogateescape decodes them) are refused: no tokenizer can take
    them and no output could carry them back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}, not UTF-8" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        return f"is not valid Unicode text ({what} at character {e.start}); give the text as UTF-8"
    return None


def check_text(text: Any, name: str) -> str:
    """`text` when it is a string of valid Unicode (`text_problem`); InvalidSetting naming `name` otherwise."""
    if not isinstance(text, str):
        raise InvalidSetting(name, f"{name} must be a string, got {'null' if text is None else type(text).__name__}")
    why = text_problem(text)
    if why is not None:
        raise InvalidSetting(name, f"{name} {why}")
    return text


def check_stops(stops: Any, name: str = "stop_strings") -> tuple[str, ...]:
    """Stop strings as a tuple: at most MAX_STOPS non-empty strings of valid Unicode, in a list (or any
    iterable but a string)."""
    if isinstance(stops, str):
        raise InvalidSetting(name, f"{name} must be a list of strings, not one string")
    if not isinstance(stops, Iterable):
        raise InvalidSetting(name, f"{name} must be a list of strings, got {type(stops).__name__}")
    stops = tuple(stops)
    if len(stops) > MAX_STOPS:
        raise InvalidSetting(name, f"{name}: at most {MAX_STOPS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        check_text(s, f"{name}[{i}]")
        if not s:
            raise InvalidSetting(name, f"{name}[{i}] is empty; a stop string needs at least one character")
    return stops
