"""Shared fixtures: tiny random models (fp32) and a tiny text corpus."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from recyclegpt.checkpoint import save_checkpoint
from recyclegpt.config import Config, ModelConfig, ModuleConfig, preset
from recyclegpt.decoding.testing import random_models
from recyclegpt.model import FullModel
from recyclegpt.module import RecyclableModule
from recyclegpt.tokenizer import Tokenizer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

torch.set_num_threads(1)  # tests are tiny; one thread keeps them deterministic and cheap on 2 cores


def tiny_pair(seed: int = 0, **model_overrides) -> tuple[Config, FullModel, RecyclableModule]:
    cfg, _ = preset("tiny")
    if model_overrides:
        cfg.model = ModelConfig(**{**cfg.model.__dict__, **model_overrides})
    torch.manual_seed(seed)
    model, module = FullModel(cfg.model).eval(), RecyclableModule(cfg.model, ModuleConfig()).eval()
    return cfg, model, module


@pytest.fixture
def tiny():
    return tiny_pair()


CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n",
    "Recyclable modules predict the token after next from the hidden state.",
    "In the morning the market opens; traders shout prices across the floor.",
    "for i in range(10):\n    print(i * i)\n",
]


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(12):
        body = f"# document {i}\n" + "\n".join(CORPUS_LINES[(i + j) % len(CORPUS_LINES)] for j in range(40))
        (d / ("sub" if i % 2 else ".") / f"doc{i}.txt").write_text(body)
    return d


def make_checkpoint(path: Path, seed: int = 3) -> Path:
    """A tiny random checkpoint with peaked logits (clear greedy margins in fp32)."""
    cfg, _ = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, tie_embeddings=False)
    model, module = random_models(seed=seed, preset_name="tiny", scale=10.0)
    tok = Tokenizer.train(CORPUS_LINES * 20, vocab_size=400)
    cfg.eos_token_id = tok.eos_id
    return save_checkpoint(path, cfg, model, module, tok)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(path, RecycleGPT) of a tiny `make_checkpoint`, loaded in fp32 on the CPU: what the server tests serve."""
    from recyclegpt import RecycleGPT

    path = make_checkpoint(tmp_path_factory.mktemp("bundle") / "ckpt")
    return path, RecycleGPT.from_pretrained(path, device="cpu", dtype="float32")


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (its helpers are tested; its measurements are not)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod
