"""Tokenize a corpus once into flat token files (numpy memmap) with a train/validation split.

Documents are joined with the EOS token. A manifest records what was tokenized (files, sizes,
mtimes, tokenizer) so a second run with the same inputs reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import RecycleError
from ..tokenizer import Tokenizer
from .corpus import ReadReport, is_validation, iter_documents

FLUSH_TOKENS = 1 << 20


@dataclass
class TokenData:
    train: np.ndarray  # memmap [N_train] of token ids
    val: np.ndarray  # memmap [N_val]
    manifest: dict

    @property
    def val_sources(self) -> list[str]:
        return self.manifest["val_sources"]


def _fingerprint(files: list[Path], tokenizer: Tokenizer, val_fraction: float, text_field: str) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.tok.to_str().encode())
    h.update(f"{val_fraction}|{text_field}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_tokens(files: list[Path], tokenizer: Tokenizer, cache_dir: str | Path, val_fraction: float = 0.05,
                   text_field: str = "text", progress: bool = True) -> TokenData:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(files, tokenizer, val_fraction, text_field)
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.is_file():
        try:  # a cache that cannot be read back is rebuilt
            manifest = json.loads(manifest_path.read_text())
            if isinstance(manifest, dict) and manifest.get("fingerprint") == fp:
                return _open(cache_dir, manifest)
        except (OSError, ValueError, KeyError, TypeError):
            pass

    if tokenizer.eos_id is None:
        raise RecycleError("the tokenizer has no <|endoftext|> token to separate documents")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    report = ReadReport()
    counts = {"train": 0, "val": 0}
    val_sources: list[str] = []
    tmp = {s: cache_dir / f".{s}.bin.tmp" for s in counts}
    handles = {s: open(tmp[s], "wb") for s in counts}
    buffers: dict[str, list[int]] = {"train": [], "val": []}
    try:
        docs = iter_documents(files, text_field, report)
        for doc in tqdm(docs, desc="tokenizing", unit="doc", disable=not progress, leave=False):
            split = "val" if is_validation(doc.text, val_fraction) else "train"
            if split == "val":
                val_sources.append(doc.source)
            buf = buffers[split]
            buf.extend(tokenizer.encode(doc.text))
            buf.append(tokenizer.eos_id)
            if len(buf) >= FLUSH_TOKENS:
                handles[split].write(np.asarray(buf, dtype=dtype).tobytes())
                counts[split] += len(buf)
                buf.clear()
        for split, buf in buffers.items():
            handles[split].write(np.asarray(buf, dtype=dtype).tobytes())
            counts[split] += len(buf)
    finally:
        for h in handles.values():
            h.close()
    if counts["train"] + counts["val"] == 0:
        for t in tmp.values():
            t.unlink(missing_ok=True)
        raise RecycleError("the data holds no text (all files empty or binary)")
    if counts["train"] == 0 or counts["val"] == 0:
        # Too few distinct documents for a document-level split: hold out the tail of the tokens.
        data = np.concatenate([np.fromfile(tmp[s], dtype=dtype) for s in ("train", "val")])
        n_val = max(1, int(len(data) * max(val_fraction, 0.05)))
        data[-n_val:].tofile(tmp["val"])
        data[:-n_val].tofile(tmp["train"])
        counts = {"train": len(data) - n_val, "val": n_val}
        val_sources = []
    for split in counts:
        os.replace(tmp[split], cache_dir / f"{split}.bin")
    manifest = {
        "fingerprint": fp,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "files": report.files,
        "skipped_binary": report.skipped_binary,
        "replaced_bytes": report.replaced_bytes,
        "val_sources": val_sources,
    }
    tmp_manifest = cache_dir / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, manifest_path)
    return _open(cache_dir, manifest)


def _open(cache_dir: Path, manifest: dict) -> TokenData:
    dtype = np.dtype(manifest["dtype"])
    train = np.memmap(cache_dir / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache_dir / "val.bin", dtype=dtype, mode="r")
    return TokenData(train, val, manifest)
