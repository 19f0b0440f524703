"""GenerationConfig: every knob of one `generate` / `stream` call, validated up front."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import RecycleError
from .drafters import HostDrafter
from .limits import INT64_MAX, SETTINGS, InvalidSetting, check_stops

MODES = ("ar", "recycle", "verify")
DRAFTERS = ("module", "ngram", "hybrid")


@dataclass
class GenerationConfig:
    """How to decode.

    mode: `ar` (one full pass per token), `recycle` (the paper; lossy), `verify` (lossless).
    max_new_tokens: per-row cap on new tokens (an int for all rows, or one per row); a row also
      stops when prompt + new tokens reach the model's max_seq_len.
    k: drafts per verify round (the start value when adaptive_k).
    temperature / top_k / top_p: 0 = greedy; top_k 0 and top_p 1 switch those filters off.
    seed: seeds the request's own random stream (None: fresh randomness every call). In a batch,
      row b draws from a stream seeded by (seed, b), so a row's text does not depend on the others.
    eos_id: token id(s) that end a row (not included in the output tokens).
    stop_strings: end a row after the token that completes any of them (needs a tokenizer).
    drafter: `module` (chained module drafts), `ngram` (prompt lookup), `hybrid` (per row and
      round, whichever promises more accepted tokens), or a `HostDrafter` object.
    tree: draft-tree node budget (0: a chain of k drafts). With tree = N > 0, each verify round
      drafts a tree of N nodes and depth k from the module's top `tree_topk` tokens per node and
      keeps the longest path the full model agrees with (`decoding.tree`); needs drafter `module`.
      "auto": `generate`/`stream` first pick the fastest chain or tree (its k and N) for this machine,
      model and setting by decoding the prompts with each candidate (`decoding.auto`; cached).
    tree_topk: children expanded per tree node (and nodes expanded per level); 2, as on the command line.
    adaptive_k: move k within [1, k_max] from recent acceptance.
    ngram_k: most n-gram drafts per round (None: k). ngram_max_n / ngram_min_n: match lengths
      tried, longest first (None: 1 for `ngram`, 2 for `hybrid`).
    compile: run each decoding round as one torch.compile'd graph (`decoding.compiled`): static shapes,
      acceptance inside, one host sync per round. A graph is compiled per round shape (width k,
      module chain, greedy or sampled) and batch size, on first use, once per process (tens of
      seconds each on a small CPU; `decoding.compiled.COMPILE_STATS` has the seconds): it pays off on
      long or repeated runs, not on one short call. Greedy output is identical to `ar` run the same
      way; a request with a seed samples the same tokens eagerly and compiled.
    """

    mode: str = "verify"
    max_new_tokens: int | Sequence[int] = 64
    k: int = 3
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_id: int | Sequence[int] | None = None
    stop_strings: Sequence[str] = field(default_factory=tuple)
    drafter: str | HostDrafter = "module"
    tree: int | str = 0  # or "auto"
    tree_topk: int = 2
    adaptive_k: bool = False
    k_max: int = 8
    ngram_k: int | None = None
    ngram_max_n: int = 3
    ngram_min_n: int | None = None
    compile: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple: one id, or any iterable of them (anything else stays one entry, which
        `validate` refuses)."""
        if self.eos_id is None:
            return ()
        if isinstance(self.eos_id, Iterable) and not isinstance(self.eos_id, str | bytes):
            return tuple(self.eos_id)
        return (self.eos_id,)

    @property
    def filtered(self) -> bool:
        """Samples with top-k or top-p: its rounds need the graph that sorts each distribution."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)

    @property
    def uses_module(self) -> bool:
        return self.mode == "recycle" or (self.mode == "verify" and self.drafter in ("module", "hybrid"))

    def row_budgets(self, batch: int) -> list[int]:
        if isinstance(self.max_new_tokens, int):
            return [self.max_new_tokens] * batch
        budgets = list(self.max_new_tokens)
        if len(budgets) != batch:
            raise RecycleError(f"max_new_tokens has {len(budgets)} entries for {batch} prompts")
        return budgets

    def validate(self) -> None:
        """RecycleError (an `InvalidSetting` naming the field) unless every setting is one the engine takes;
        the numeric ranges and text checks are `limits.SETTINGS` / `check_text`, shared with the CLI and server."""
        if self.mode not in MODES:
            raise InvalidSetting("mode", f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        many = isinstance(self.max_new_tokens, Sequence) and not isinstance(self.max_new_tokens, str)
        for b in self.max_new_tokens if many else [self.max_new_tokens]:
            SETTINGS["max_new_tokens"].check(b)
        for name in ("k", "k_max", "ngram_max_n", "ngram_k", "ngram_min_n", "temperature", "top_k", "top_p", "seed"):
            SETTINGS[name].check(getattr(self, name))
        if self.ngram_min_n is not None and self.ngram_min_n > self.ngram_max_n:
            raise InvalidSetting("ngram_min_n", f"ngram_min_n={self.ngram_min_n} is larger than "
                                 f"ngram_max_n={self.ngram_max_n}")
        if isinstance(self.drafter, str):
            if self.drafter not in DRAFTERS:
                raise InvalidSetting("drafter", f"unknown drafter {self.drafter!r}; choose one of: "
                                     f"{', '.join(DRAFTERS)}")
        elif not isinstance(self.drafter, HostDrafter):
            raise InvalidSetting("drafter", "drafter must be 'module', 'ngram', 'hybrid' "
                                 "or an object with propose() and reset()")
        SETTINGS["tree"].check(self.tree)
        SETTINGS["tree_topk"].check(self.tree_topk)
        if self.tree:
            if self.mode != "verify" or self.drafter != "module":
                raise InvalidSetting("tree", "draft trees need mode 'verify' with drafter 'module' (set tree=0 "
                                     "otherwise)")
            if self.adaptive_k:
                raise InvalidSetting("tree", "draft trees have a fixed depth k; turn adaptive_k off or set tree=0")
            if self.tree != "auto" and self.tree < self.k:
                raise InvalidSetting("tree", f"a tree of depth k={self.k} needs at least k nodes, got tree={self.tree}")
        if not isinstance(self.compile, bool):
            raise InvalidSetting("compile", f"compile must be True or False, got {self.compile!r}")
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= INT64_MAX for e in self.eos_ids):
            raise InvalidSetting("eos_id", f"eos_id must be a token id (or a list of them), got {self.eos_id!r}")
        check_stops(self.stop_strings)
