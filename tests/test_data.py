"""Corpus reading, tokenizer, token cache and split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recyclegpt.data import iter_documents, prepare_tokens, resolve_files, stdlib_files
from recyclegpt.data.corpus import ReadReport
from recyclegpt.errors import RecycleError
from recyclegpt.tokenizer import StreamDecoder, Tokenizer


def test_resolve_dirs_glob_and_hidden(text_dir):
    (text_dir / ".git").mkdir()
    (text_dir / ".git" / "x.txt").write_text("hidden")
    files = resolve_files([text_dir])
    assert len(files) == 12 and all(".git" not in str(f) for f in files)
    assert resolve_files([text_dir], glob="sub/*.txt") == sorted((text_dir / "sub").glob("*.txt"))
    with pytest.raises(RecycleError, match="no files matching"):
        resolve_files([text_dir], glob="*.md")
    with pytest.raises(RecycleError, match="not found"):
        resolve_files([text_dir / "nope"])


def test_jsonl_binary_and_bad_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
    report = ReadReport()
    docs = list(iter_documents(resolve_files([tmp_path]), report=report))
    assert [d.text for d in docs[:2]] == ["hello", "world"]
    assert docs[2].text == "caf\ufffd latin-1"
    assert report.skipped_binary == [str(tmp_path / "b.bin")]
    assert report.replaced_bytes == [str(tmp_path / "c.txt")]
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(RecycleError, match="d.jsonl:1: record has no string field 'text'"):
        list(iter_documents([tmp_path / "d.jsonl"]))
    (tmp_path / "e.jsonl").write_text("{not json\n")
    with pytest.raises(RecycleError, match="invalid JSON"):
        list(iter_documents([tmp_path / "e.jsonl"]))


def test_stdlib_corpus_is_present():
    files = stdlib_files()
    assert len(files) > 300
    assert not any("/test/" in str(f) or "site-packages" in str(f) for f in files)


def test_tokenizer_roundtrip_and_streaming(tmp_path):
    tok = Tokenizer.train(["héllo wörld, def f(x): return x + 1\n"] * 50, vocab_size=300)
    text = "héllo wörld 🙂 def f(x):"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    tok.save(tmp_path / "tokenizer.json")
    tok2 = Tokenizer.load(tmp_path)
    assert tok2.encode(text) == ids and tok2.eos_id == tok.eos_id is not None
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters are held back
    # linear time: a push decodes only the tokens since the last piece (plus that piece as context)
    calls = []
    decode = tok.decode
    tok.decode = lambda ids: calls.append(len(ids)) or decode(ids)
    dec = StreamDecoder(tok)
    long_ids = ids * 40
    assert "".join([dec.push([i]) for i in long_ids] + [dec.flush()]) == text * 40
    assert max(calls) <= 8  # never the whole output
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RecycleError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")


def test_token_cache_split_and_reuse(text_dir, tmp_path):
    tok = Tokenizer.train([p.read_text() for p in resolve_files([text_dir])], vocab_size=300)
    files = resolve_files([text_dir])
    data = prepare_tokens(files, tok, tmp_path / "cache", val_fraction=0.2, progress=False)
    assert len(data.train) > 0 and len(data.val) > 0
    assert data.train.dtype == np.uint16
    assert int(np.asarray(data.train).max()) < tok.vocab_size
    assert set(data.val_sources) <= {str(f) for f in files}
    mtime = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    again = prepare_tokens(files, tok, tmp_path / "cache", val_fraction=0.2, progress=False)
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert np.array_equal(np.asarray(again.train), np.asarray(data.train))
    # The split is decided per document: train and validation never share a source.
    n_docs = len(files)
    assert 0 < len(data.val_sources) < n_docs
