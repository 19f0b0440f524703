"""Byte-level BPE tokenizer (Hugging Face `tokenizers` format, saved as tokenizer.json)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import RecycleError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token: str | None = EOS_TOKEN):
        self.tok = tok
        self.eos_id: int | None = tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        if vocab_size < 300:
            raise RecycleError(f"vocab_size={vocab_size} is too small for byte-level BPE (need >= 300)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = EOS_TOKEN) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise RecycleError(f"tokenizer file not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise RecycleError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        if eos_token and tok.token_to_id(eos_token) is None:
            eos_token = None
        return cls(tok, eos_token)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Incremental detokenization in time linear in the output: yields only text that can no longer change.

    Each push decodes only the tokens since the last yielded piece, plus the piece before it as context
    (`prefix`..`read`), and yields what the new tokens add. Byte-level BPE can split a UTF-8 character
    over tokens: while the new text ends in U+FFFD, nothing is yielded until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were yielded already; they are decoded again as context
        self.read = 0

    def _new_text(self) -> str:
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(seen):]

    def push(self, new_ids: Iterable[int]) -> str:
        self.ids.extend(new_ids)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def flush(self) -> str:
        text = self._new_text()
        self.prefix = self.read = len(self.ids)
        return text


def iter_texts_chunked(texts: Iterable[str], chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Split long documents so the BPE trainer never holds one giant string."""
    for t in texts:
        for i in range(0, len(t), chunk_chars):
            yield t[i:i + chunk_chars]
