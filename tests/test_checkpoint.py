"""Checkpoint save/load round trip and the one-line errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_pair

from recyclegpt.checkpoint import load_checkpoint, save_checkpoint
from recyclegpt.config import ModelConfig, ModuleConfig
from recyclegpt.errors import RecycleError
from recyclegpt.module import RecyclableModule
from recyclegpt.tokenizer import Tokenizer


@pytest.fixture
def ckpt(tmp_path):
    cfg, model, module = tiny_pair(7)
    tok = Tokenizer.train(["some text for a tokenizer " * 20], vocab_size=300)
    cfg.eos_token_id = tok.eos_id
    return save_checkpoint(tmp_path / "ckpt", cfg, model, module, tok), model, module


def test_round_trip(ckpt):
    path, model, module = ckpt
    _, m2, mod2, tok = load_checkpoint(path)
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        a, h = model(x)
        b, h2 = m2(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(module(model, x, h)[0], mod2(m2, x, h2)[0], rtol=0, atol=0)
    assert m2.output.weight is m2.tok_embeddings.weight  # tying survives the round trip


def test_missing_and_corrupt(ckpt, tmp_path):
    path, _, _ = ckpt
    with pytest.raises(RecycleError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing")
    (path / "module.safetensors").write_bytes(b"garbage")
    with pytest.raises(RecycleError, match="corrupt weights file"):
        load_checkpoint(path)
    (path / "config.json").write_text("{broken")
    with pytest.raises(RecycleError, match="corrupt"):
        load_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(RecycleError, match="missing tokenizer.json"):
        load_checkpoint(path)


def test_module_that_does_not_fit(ckpt, tmp_path):
    path, _, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    other = RecyclableModule(ModelConfig(**{**cfg["model"], "dim": 32, "n_head": 2, "n_kv_head": 1}), ModuleConfig())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path / "module.safetensors"))
    with pytest.raises(RecycleError, match="does not fit the model"):
        load_checkpoint(path)


def test_save_is_atomic(ckpt, monkeypatch):
    path, model, module = ckpt
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    cfg, _, _, tok = load_checkpoint(path)

    def boom(_dir):
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(path, cfg, model, module, tok, write_extra=boom)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
