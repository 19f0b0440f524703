"""Shared fixtures: tiny random models (fp32) and a tiny text corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recyclegpt.config import Config, ModelConfig, ModuleConfig, preset
from recyclegpt.model import FullModel
from recyclegpt.module import RecyclableModule

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
