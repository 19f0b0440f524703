"""Loads the tiny local test tasks' data (no hub access): `custom_dataset: !function data.<name>`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc(**_kw) -> datasets.DatasetDict:
    return _load("mc")


def ppl(**_kw) -> datasets.DatasetDict:
    return _load("ppl")


def gen(**_kw) -> datasets.DatasetDict:
    return _load("gen")
