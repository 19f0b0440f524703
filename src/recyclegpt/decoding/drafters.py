"""Drafters other than the module, and the controllers that pick how much to draft.

- `HostDrafter`: anything that proposes draft tokens from a row's token history on the host
  (`propose(row, context, k) -> list[int]`, at most k tokens). `NgramDrafter` (prompt lookup) is
  one; tests plug in oracles through the same door.
- `AcceptanceTracker`: recent acceptance by draft position (exponential moving average), used to
  predict how many drafts a round will get accepted.
- `AdaptiveK`: moves k one step at a time towards the k that maximises predicted tokens per unit
  of round cost.
- `prefer_ngram`: the hybrid drafter's per-row choice between the module chain and an n-gram match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class HostDrafter(Protocol):
    """Proposes up to k draft tokens for `row` given its whole token history.

    `context` is prompt + generated tokens; its last element is the token the next full pass
    processes, so the drafts are guesses for the tokens after it. Row indices are batch slots:
    `reset(row)` is called when a slot starts a new sequence.
    """

    def propose(self, row: int, context: Sequence[int], k: int) -> list[int]: ...

    def reset(self, row: int) -> None: ...


class NgramDrafter:
    """Prompt-lookup drafting: find the latest earlier occurrence of the context's last n tokens
    (n from max_n down to min_n) and propose the tokens that followed it.

    Per row an index from n-gram -> latest end position is kept and extended incrementally, so a
    proposal costs O(max_n) per new token instead of a scan of the context.
    """

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self._rows: dict[int, _NgramIndex] = {}

    def reset(self, row: int) -> None:
        self._rows.pop(row, None)

    def propose(self, row: int, context: Sequence[int], k: int) -> list[int]:
        idx = self._rows.get(row)
        if idx is None or len(context) < idx.length or (idx.length and context[idx.length - 1] != idx.last):
            idx = self._rows[row] = _NgramIndex(self.max_n)
        idx.extend(context)
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            end = idx.prev_end[n]
            if end is not None:
                return list(context[end + 1:end + 1 + k])
        return []


class _NgramIndex:
    def __init__(self, max_n: int):
        self.max_n = max_n
        self.length = 0
        self.last: int | None = None
        self.latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        # prev_end[n]: end index of the latest occurrence, before the current suffix, of the
        # context's last n tokens (None: no earlier occurrence).
        self.prev_end: list[int | None] = [None] * (max_n + 1)

    def extend(self, context: Sequence[int]) -> None:
        for j in range(self.length, len(context)):
            for n in range(1, self.max_n + 1):
                if j + 1 < n:
                    self.prev_end[n] = None
                    continue
                key = tuple(context[j + 1 - n:j + 1])
                table = self.latest[n]
                self.prev_end[n] = table.get(key)
                table[key] = j
        self.length = len(context)
        self.last = context[-1] if context else None


class AcceptanceTracker:
    """Moving averages of P(draft i accepted | drafts 1..i-1 accepted), i = 1..max_k."""

    def __init__(self, max_k: int, prior: float = 0.6, decay: float = 0.9):
        self.alpha = [prior] * (max_k + 1)  # index 0 unused
        self.seen = [False] * (max_k + 1)
        self.decay = decay

    def update(self, proposed: int, accepted: int) -> None:
        """One row-round: `proposed` drafts, the first `accepted` of them accepted."""
        for i in range(1, min(proposed, accepted + 1, len(self.alpha) - 1) + 1):
            if not self.seen[i]:
                self.alpha[i] = self.rate(i)  # start from what was assumed for it so far
            hit = 1.0 if i <= accepted else 0.0
            self.alpha[i] = self.decay * self.alpha[i] + (1 - self.decay) * hit
            self.seen[i] = True

    def rate(self, i: int) -> float:
        # Positions never tried inherit the nearest tried position's rate (no optimism).
        i = min(i, len(self.alpha) - 1)
        while i > 1 and not self.seen[i]:
            i -= 1
        return self.alpha[i]

    def expected_accepted(self, k: int) -> float:
        """Expected accepted drafts out of k: sum_i prod_{j<=i} alpha_j."""
        total, run = 0.0, 1.0
        for i in range(1, k + 1):
            run *= self.rate(i)
            total += run
        return total


def count_by_position(proposed: list, accepted: list, n_proposed: int, n_accepted: int) -> None:
    """Count one row-round into per-position totals (in place, grown as needed): `n_proposed` drafts, the first
    `n_accepted` accepted. Position i is proposed when every draft before it was accepted."""
    while len(proposed) < n_proposed:
        proposed.append(0)
        accepted.append(0)
    for i in range(min(n_proposed, n_accepted + 1)):
        proposed[i] += 1
        if i < n_accepted:
            accepted[i] += 1


class AcceptanceRates:
    """P(draft i accepted | drafts 1..i-1 accepted) over many rows: counts that fade by `decay` per `fade()`,
    so the estimate is the data from the first observation on (no prior to unlearn, unlike `AcceptanceTracker`)
    and follows drift. Positions never tried inherit the nearest tried position's rate; nothing tried: 0."""

    def __init__(self, decay: float = 0.98):
        self.proposed: list[float] = []
        self.accepted: list[float] = []
        self.decay = decay

    def update(self, proposed: int, accepted: int) -> None:
        """One row-round: `proposed` drafts, the first `accepted` of them accepted."""
        count_by_position(self.proposed, self.accepted, proposed, accepted)

    def fade(self) -> None:
        self.proposed = [x * self.decay for x in self.proposed]
        self.accepted = [x * self.decay for x in self.accepted]

    def expected_accepted(self, k: int) -> float:
        """Expected accepted drafts out of k: sum_i prod_{j<=i} rate_j."""
        total, run, rate = 0.0, 1.0, 0.0
        for i in range(k):
            if i < len(self.proposed) and self.proposed[i] > 0:
                rate = self.accepted[i] / self.proposed[i]
            run *= rate
            total += run
        return total


class AdaptiveK:
    """Grows/shrinks k by one per round towards argmax_k (1 + E[accepted | k]) / (1 + cost * k).

    `cost` is one draft token's price relative to a full pass (a module step plus the wider verify
    pass: a module step is a sizeable fraction of a full pass, an n-gram draft nearly free; the engine
    uses 0.25 and 0.05).
    """

    def __init__(self, k: int, k_min: int = 1, k_max: int = 8, cost: float = 0.25,
                 tracker: AcceptanceTracker | None = None):
        self.k_min, self.k_max, self.cost = k_min, max(k_max, k), cost
        self.k = min(max(k, k_min), self.k_max)
        self.tracker = tracker if tracker is not None else AcceptanceTracker(self.k_max)

    def update(self, proposed: int, accepted: int) -> None:
        self.tracker.update(proposed, accepted)

    def next_k(self) -> int:
        def gain(k: int) -> float:
            return (1 + self.tracker.expected_accepted(k)) / (1 + self.cost * k)

        best = max(range(self.k_min, self.k_max + 1), key=gain)
        self.k += (best > self.k) - (best < self.k)
        return self.k


def prefer_ngram(module_tracker: AcceptanceTracker, k_module: int, ngram_tracker: AcceptanceTracker,
                 n_ngram: int) -> bool:
    """Hybrid choice for one row: take the n-gram proposal when it promises more accepted tokens."""
    if n_ngram == 0:
        return False
    return ngram_tracker.expected_accepted(n_ngram) > module_tracker.expected_accepted(k_module)
