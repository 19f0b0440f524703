"""Python API: load a checkpoint and generate text in any mode.

    from recyclegpt import RecycleGPT
    m = RecycleGPT.from_pretrained("ckpt/")
    m.generate(["def add(a, b):"], mode="verify", max_new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, references_base
from .config import Config
from .decoding import GenerationConfig, GenerationResult, generate, stream
from .errors import RecycleError
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
            kw["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        try:
            gc = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, **kw)
        except TypeError as e:
            raise RecycleError(f"unknown generation option: {e}") from None
        gc.validate()
        return gc

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer.encode_batch(list(prompts))
        for i, p in enumerate(ids):
            if not p:
                raise RecycleError(f"prompt {i} is empty; give some text to continue")
        return ids

    @torch.inference_mode()
    def generate_with_stats(self, prompts: str | Sequence[str], mode: str = "verify", max_new_tokens: int = 64,
                            **kw) -> GenerationResult:
        """Like `generate`, but returns the GenerationResult (tokens, texts, finish reasons, stats)."""
        gc = self.config(mode, max_new_tokens, **kw)
        return generate(self.model, self.module, self.encode(prompts), gc, tokenizer=self.tokenizer)

    def generate(self, prompts: str | Sequence[str], mode: str = "verify", max_new_tokens: int = 64,
                 **kw) -> list[str]:
        """Continue each prompt; returns the new text per prompt.

        mode: 'ar' | 'recycle' (the paper, lossy) | 'verify' (lossless, the default).
        Keywords: k, adaptive_k, drafter ('module' | 'ngram' | 'hybrid'), temperature, top_k, top_p,
        seed, stop (a string or list of strings), eos_id.
        """
        res = self.generate_with_stats(prompts, mode, max_new_tokens, **kw)
        return res.texts if res.texts is not None else [self.tokenizer.decode(t) for t in res.tokens]

    def stream(self, prompt: str, mode: str = "verify", max_new_tokens: int = 64, **kw) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as tokens are accepted.

        With stop strings, the last len(longest stop)-1 characters are held back until the row ends,
        so text after a stop string is never yielded.
        """
        gc = self.config(mode, max_new_tokens, **kw)
        hold = max((len(s) for s in gc.stop_strings), default=1) - 1
        dec = StreamDecoder(self.tokenizer)
        text, emitted = "", 0
        with torch.inference_mode():
            gen = stream(self.model, self.module, self.encode(prompt), gc, tokenizer=self.tokenizer)
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
