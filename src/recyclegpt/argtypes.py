"""Argument types and the parser class of the whole command line (`recyclegpt` and `recyclegpt bench serve`).

Every value is checked by argparse, before any work: numbers are finite and within their bounds (the ranges of
decoding settings come from `decoding.limits.SETTINGS`, the one table the Python API and the server check too),
text is valid UTF-8. A bad value is one line: `error: argument --top-p: must be in (0, 1], got 2 (see: ...)`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from .decoding.limits import SETTINGS, Setting, text_problem


class UsageError(Exception):
    """A command-line usage error (argparse's); main() prints it as one line and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --top-p: must be in (0, 1], got 2 (...)`; no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


def checked(setting: Setting) -> Callable[[str], int | float]:
    """An argparse type: `setting.kind(s)`, then `setting.problem` (finite, within its bounds): the one range
    check of `decoding.limits`, here with argparse's "argument --flag:" in front."""

    def parse(s: str) -> int | float:
        v = setting.kind(s)  # ValueError: argparse says "invalid int value: 'x'"
        why = setting.problem(v)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return v
    parse.__name__ = setting.kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: `kind(s)`, finite (no nan/inf), within lo..hi (an end excluded when open)."""
    return checked(Setting("", kind, lo, hi, lo_open, hi_open))


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: `kind(s)`, refused unless finite and > 0."""
    return number(kind, 0, lo_open=True)


positive_float = positive(float)
positive_int = positive(int)
nonneg_int = number(int, 0)  # 0 allowed
nonneg_float = number(float, 0)
unit = number(float, 0, 1)  # a weight in [0, 1]
fraction = number(float, 0, 1, hi_open=True)  # --val-fraction: a share held out, [0, 1)
seed = number(int, 0, 2**32 - 1)  # a run's seed (train, bench): fits numpy's and torch's, offsets per rank/row
port = number(int, 1, 65535)
vocab_size = number(int, 1, 1 << 22)  # the checkpoint config's own bound (config.py)


def setting(name: str) -> Callable[[str], int | float]:
    """An argparse type for a decoding request's setting, held to `limits.SETTINGS`: the ranges the Python
    API and the server check too."""
    return checked(SETTINGS[name])


draft_k = setting("k")  # drafts per verify round: a round holds k+1 positions per row
tree_nodes = setting("tree")  # a draft tree's node budget (0: a chain)
tree_topk = setting("tree_topk")


def tree_or_auto(s: str) -> int | str:
    """--tree: a node budget, or `auto` (measure chains and trees here, keep the fastest)."""
    return "auto" if s.strip().lower() == "auto" else tree_nodes(s)


tree_or_auto.__name__ = "int"


def batch_sizes(s: str) -> list[int]:
    """--batches: comma-separated batch sizes, e.g. 1,2,4,8."""
    try:
        return [positive_int(x) for x in s.split(",")]  # its range error names the bad size
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {s!r}") from None


batch_sizes.__name__ = "list"


def text(s: str) -> str:
    """An argparse type for text (--prompt, --stop, ...). Command-line bytes that are not UTF-8 arrive as
    lone surrogates (Python's surrogateescape); they are refused here (`limits.text_problem`), never passed on
    or replaced."""
    why = text_problem(s)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return s


text.__name__ = "text"


def stop_text(s: str) -> str:
    """An argparse type for --stop: non-empty UTF-8 text."""
    if not s:
        raise argparse.ArgumentTypeError("must not be empty")
    return text(s)


stop_text.__name__ = "text"
