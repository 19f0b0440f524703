"""`generate` and `stream`: a batch of prompts decoded to completion on an `Engine`.

Each prompt is one request in its own slot (row b in slot b, with the config's settings, its own
token budget and a seed derived from (seed, b)); the prefill is the first event, then one event
per engine step until every row is done. Rows that finish early sit idle in their slots.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import RecycleError
from ..model import FullModel
from ..module import RecyclableModule
from .engine import Engine, add_by_position, row_configs
from .options import GenerationConfig
from .stops import Decodes, StopFn, trim_at_stop


@dataclass
class DecodeStats:
    """Counters of one generation. Passes are batched calls (one call over B rows counts once).

    tau (mean accepted length) = new tokens / full passes during decoding, per row-pass: the token
    the prefill produces and the prefill pass itself are excluded, the bonus token is included.
    acceptance_by_position[i] = P(draft i+1 accepted | drafts 1..i accepted), over decoding rows.
    """

    mode: str
    batch_size: int
    k: int | None = None
    prefill_passes: int = 0
    full_passes: int = 0
    module_passes: int = 0
    new_tokens: list[int] = field(default_factory=list)  # per row, including a final EOS
    row_passes: list[int] = field(default_factory=list)  # per row, decode passes while decoding
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafter_rounds: dict[str, int] = field(default_factory=dict)  # row-rounds per drafter
    k_used: list[int] = field(default_factory=list)  # planned drafts of every verify row-round
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tau(self) -> float:
        passes = sum(self.row_passes)
        produced = sum(max(0, t - 1) for t in self.new_tokens)
        return produced / passes if passes else float("nan")

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_by_position, self.proposed_by_position, strict=True) if p]

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.total_new_tokens / t if t > 0 else float("nan")


@dataclass
class StepEvent:
    """One decoding step: tokens[b] are row b's newly accepted tokens (possibly none)."""

    step: int  # 0 = prefill
    tokens: list[list[int]]
    finish_reasons: list[str | None]  # per row: None while running, else 'eos' | 'stop' | 'length'
    done: bool


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (no EOS; a stop string's last token included)
    finish_reasons: list[str | None]
    stats: DecodeStats
    texts: list[str] | None = None  # decoded, cut before any stop string (with a tokenizer)


class Generation:
    """Iterator of StepEvents (the prefill first); `result()` finishes the run and returns the outcome."""

    def __init__(self, model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
                 config: GenerationConfig | None = None, tokenizer: Decodes | None = None,
                 stop_fn: StopFn | None = None):
        config = config or GenerationConfig()
        config.validate()
        if not prompts:
            raise RecycleError("no prompts given")
        if config.tree == "auto":  # measuring drafts is the caller's step, before decoding starts
            raise RecycleError("tree='auto' must be resolved before decoding: RecycleGPT.generate / stream do "
                               "it, or call decoding.auto.resolve_draft(model, module, prompts, config) first")
        self.config, self.tokenizer = config, tokenizer
        self._configs = row_configs(config, len(prompts))
        self._prompts = prompts
        self.engine = Engine(model, module if config.uses_module else None, len(prompts), config.compile,
                             tokenizer, stop_fn)
        self._step = -1

    @property
    def done(self) -> bool:
        return self._step >= 0 and not self.engine.decoding()

    def __iter__(self) -> Iterator[StepEvent]:
        return self

    def __next__(self) -> StepEvent:
        if self._step < 0:
            return self.start()
        if self.done:
            raise StopIteration
        return self.step()

    def start(self) -> StepEvent:
        """Admit every prompt (prefill) and return the event of the first tokens."""
        for i, p in enumerate(self._prompts):
            try:
                self.engine.check_prompt(p)
            except RecycleError as e:
                raise RecycleError(f"prompt {i}: {e}") from None
        outs = self.engine.admit_many(list(zip(range(len(self._prompts)), self._prompts, self._configs, strict=True)))
        self._step = 0
        return self._event([o.tokens for o in outs])

    def step(self) -> StepEvent:
        outs = self.engine.step()
        self._step += 1
        return self._event([o.tokens if o is not None else [] for o in outs])

    def _event(self, tokens: list[list[int]]) -> StepEvent:
        reasons = [self.engine.request(b).finish for b in range(len(self._prompts))]
        return StepEvent(self._step, tokens, reasons, self.done)

    @property
    def stats(self) -> DecodeStats:
        reqs = [self.engine.request(b) for b in range(len(self._prompts))]
        es = self.engine.stats
        cfg = self.config
        st = DecodeStats(cfg.mode, len(reqs), cfg.k if cfg.mode == "verify" else None, es.prefill_passes,
                         es.steps, es.module_passes, [r.stats.produced for r in reqs],
                         [r.stats.rounds for r in reqs], prefill_s=es.prefill_s, decode_s=es.decode_s)
        for r in reqs:
            rs = r.stats
            add_by_position(st.proposed_by_position, st.accepted_by_position, rs)
            for label, n in rs.drafter_rounds.items():
                st.drafter_rounds[label] = st.drafter_rounds.get(label, 0) + n
        # k_used in round order (one entry per verify row-round)
        st.k_used = [k for r in reqs for k in r.stats.k_used]
        return st

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        reqs = [self.engine.request(b) for b in range(len(self._prompts))]
        tokens = [list(r.generated) for r in reqs]
        texts = None
        if self.tokenizer is not None:
            texts = [trim_at_stop(self.tokenizer.decode(t), self.config.stop_strings) for t in tokens]
        return GenerationResult(tokens, [r.finish for r in reqs], self.stats, texts)


def stream(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
           config: GenerationConfig | None = None, tokenizer: Decodes | None = None,
           stop_fn: StopFn | None = None) -> Generation:
    """Decode step by step: iterate for StepEvents; `.result()` gives the GenerationResult."""
    return Generation(model, module, prompts, config, tokenizer, stop_fn)


@torch.inference_mode()
def generate(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None, tokenizer: Decodes | None = None,
             stop_fn: StopFn | None = None) -> GenerationResult:
    """Decode every prompt to completion (see the package docstring)."""
    return stream(model, module, prompts, config, tokenizer, stop_fn).result()
