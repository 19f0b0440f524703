"""Python API: load a checkpoint and generate text in any mode.

    from recyclegpt import RecycleGPT
    m = RecycleGPT.from_pretrained("ckpt/")
    m.generate(["def add(a, b):"], mode="verify", max_new_tokens=64)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, references_base
from .config import Config
from .decoding import GenerationConfig, GenerationResult, generate, stream
from .decoding.auto import AutoChoice, choose_draft, resolve_draft
from .decoding.limits import check_text
from .errors import RecycleError, RecycleWarning
from .model import FullModel
from .module import RecyclableModule
from .runtime import resolve_device, resolve_dtype
from .tokenizer import StreamDecoder, Tokenizer


class RecycleGPT:
    """A full model, its recyclable module and their tokenizer, ready to decode."""

    def __init__(self, cfg: Config, model: FullModel, module: RecyclableModule, tokenizer: Tokenizer):
        self.cfg, self.model, self.module, self.tokenizer = cfg, model, module, tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = "auto",
                        dtype: str | torch.dtype | None = "auto") -> RecycleGPT:
        """Load a checkpoint (or a training run directory). dtype 'auto' is bf16 where the CPU has
        native bf16 (or on CUDA), else fp32; fp32 for a transformers base (`runtime.resolve_dtype`)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, generic=references_base(path))
        cfg, model, module, tokenizer = load_checkpoint(path, dev, dt)
        return cls(cfg, model, module, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def config(self, mode: str = "verify", max_new_tokens: int = 64, **kw) -> GenerationConfig:
        """A GenerationConfig with this model's EOS filled in; keyword arguments as GenerationConfig."""
        kw.setdefault("eos_id", self.tokenizer.eos_id)
        stop = kw.pop("stop", None)
        if stop is not None:
            kw["stop_strings"] = _texts(stop, "stop", "stop string")
        try:
            gc = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, **kw)
        except TypeError as e:
            raise RecycleError(f"unknown generation option: {e}") from None
        gc.validate()
        return gc

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids per prompt; RecycleError unless `prompts` is a string or a non-empty list of non-empty
        strings of valid Unicode (no lone surrogates)."""
        texts = _texts(prompts, "prompts", "prompt")
        if not texts:
            raise RecycleError("no prompts given; pass a string or a non-empty list of strings")
        ids = self.tokenizer.encode_batch(texts)
        for i, p in enumerate(ids):
            if not p:
                raise RecycleError(f"prompt {i} is empty; give some text to continue")
        return ids

    def _warn_context_cap(self, ids: list[list[int]], gc: GenerationConfig) -> None:
        """One RecycleWarning per call when the model's context leaves a row fewer new tokens than asked
        (decoding then stops the row there); prompts that do not fit at all are an error in decoding."""
        ctx = self.model.cfg.max_seq_len
        asked = [gc.max_new_tokens] * len(ids) if isinstance(gc.max_new_tokens, int) else list(gc.max_new_tokens)
        if len(asked) != len(ids):
            return  # decoding refuses the mismatch
        capped = [(i, len(p), n) for i, (p, n) in enumerate(zip(ids, asked, strict=True)) if 0 < ctx - len(p) < n]
        if capped:
            i, n_prompt, n = capped[0]
            more = f" (and {len(capped) - 1} more prompt{'s' if len(capped) > 2 else ''})" if len(capped) > 1 else ""
            tokens = f"{n_prompt} prompt token{'s' if n_prompt > 1 else ''}"
            warnings.warn(f"the model's context of {ctx} tokens caps the new tokens at {ctx - n_prompt} for prompt "
                          f"{i} ({tokens}; {n} asked){more}", RecycleWarning, stacklevel=3)

    @torch.inference_mode()
    def generate_with_stats(self, prompts: str | Sequence[str], mode: str = "verify", max_new_tokens: int = 64,
                            **kw) -> GenerationResult:
        """Like `generate`, but returns the GenerationResult (tokens, texts, finish reasons, stats)."""
        gc = self.config(mode, max_new_tokens, **kw)
        ids = self.encode(prompts)
        self._warn_context_cap(ids, gc)
        gc, _ = resolve_draft(self.model, self.module, ids, gc)
        return generate(self.model, self.module, ids, gc, tokenizer=self.tokenizer)

    def generate(self, prompts: str | Sequence[str], mode: str = "verify", max_new_tokens: int = 64,
                 **kw) -> list[str]:
        """Continue each prompt; returns the new text per prompt.

        mode: 'ar' | 'recycle' (the paper, lossy) | 'verify' (lossless, the default).
        Keywords: k, adaptive_k, drafter ('module' | 'ngram' | 'hybrid'), tree (a draft tree's node
        budget; 0 = a chain of k; 'auto' = measure and pick, see `choose_draft`), tree_topk, temperature,
        top_k, top_p, seed, stop (a string or list of strings), eos_id, compile.
        """
        res = self.generate_with_stats(prompts, mode, max_new_tokens, **kw)
        return res.texts if res.texts is not None else [self.tokenizer.decode(t) for t in res.tokens]

    @torch.inference_mode()
    def choose_draft(self, prompts: str | Sequence[str], batch_size: int | None = None, refresh: bool = False,
                     progress=None, max_new_tokens: int = 48, **kw) -> AutoChoice:
        """The fastest `verify` draft (a chain of k, or a tree of N nodes) for decoding prompts like these,
        `batch_size` at a time (default: all together), in the setting of the keywords (temperature,
        top_k, top_p, compile): measured on this machine (every candidate decodes the prompts), then
        cached per weights, machine and setting (`decoding.auto`). `tree="auto"` in generate/stream
        does the same first (`decoding.auto.resolve_draft`), with the prompts it is given."""
        kw = {key: v for key, v in kw.items() if key not in ("k", "tree", "tree_topk")}
        gc = self.config("verify", max_new_tokens, **kw)
        return choose_draft(self.model, self.module, self.encode(prompts), gc, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, refresh=refresh, progress=progress)

    def stream(self, prompt: str, mode: str = "verify", max_new_tokens: int = 64, **kw) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as tokens are accepted.

        One prompt (a string; a list holding exactly one string is accepted too): several are refused,
        never silently cut to the first (use `generate` for a batch). Arguments are checked when called,
        before the first piece is asked for.
        With stop strings, the last len(longest stop)-1 characters are held back until the row ends,
        so text after a stop string is never yielded.
        """
        if not isinstance(prompt, str) and isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
            if len(prompt) != 1:
                raise RecycleError(f"stream takes one prompt, got {len(prompt)}; use generate() for several")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RecycleError(f"stream takes one prompt as a string, got {_type_name(prompt)}")
        gc = self.config(mode, max_new_tokens, **kw)
        ids = self.encode(prompt)
        self._warn_context_cap(ids, gc)
        gc, _ = resolve_draft(self.model, self.module, ids, gc)
        return self._stream(ids, gc)

    def _stream(self, ids: list[list[int]], gc: GenerationConfig) -> Iterator[str]:
        hold = max((len(s) for s in gc.stop_strings), default=1) - 1
        dec = StreamDecoder(self.tokenizer)
        text, emitted = "", 0
        with torch.inference_mode():
            gen = stream(self.model, self.module, ids, gc, tokenizer=self.tokenizer)
            for event in gen:
                text += dec.push(event.tokens[0])
                safe = len(text) - hold
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            text += dec.flush()
            texts = gen.result().texts
            final = texts[0] if texts is not None else text
            if len(final) > emitted:
                yield final[emitted:]


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _texts(value: Any, arg: str, item: str) -> list[str]:
    """`value` (one string, or a list/tuple of strings) as a list of strings of valid Unicode; RecycleError
    saying what was expected otherwise (bytes, None, numbers, a list holding a non-string, lone surrogates)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise RecycleError(f"{arg} must be a string or a list of strings, got {_type_name(value)}")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise RecycleError(f"{arg} must be a string or a list of strings; {item} {i} is {_type_name(s)}")
        check_text(s, f"{item} {i}")
    return list(items)
