"""Joint objective alignment, leak test, resume determinism, data-parallel ranks, bad --out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pair
from safetensors.torch import load_file

from recyclegpt.errors import RecycleError
from recyclegpt.training import JointModel, TrainOptions, read_metrics, train


@torch.no_grad()
def test_unrolled_training_equals_decode_time_chain():
    """Step 1 at t reads (h_t, x_{t+1}); step 2 reads (g_t, x_{t+2}) at position t+1, attending to the
    true step-1 entries before it: exactly what chained drafting does with the module's cache."""
    cfg, model, module = tiny_pair(3)
    x = torch.randint(0, cfg.model.vocab_size, (1, 12))
    _, h = model(x)
    step1, step2 = module.forward_unrolled(model, x, h, 2)
    for t in range(0, 9):
        module.setup_caches(1, torch.float32)
        if t > 0:  # true entries 0..t-1
            module(model, x[:, 1:t + 1], h[:, :t], torch.arange(t)[None])
        l1, g = module(model, x[:, t + 1:t + 2], h[:, t:t + 1], torch.tensor([[t]]))
        l2, _ = module(model, x[:, t + 2:t + 3], g, torch.tensor([[t + 1]]))
        torch.testing.assert_close(step1[0, t], l1[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step2[0, t], l2[0, 0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_joint_loss_alignment_hand_made():
    """x = [5, 6, 7, 8]: the module's step-1 pairs are (h_0, 6)->7 and (h_1, 7)->8."""
    cfg, model, module = tiny_pair(4)
    x = torch.tensor([[5, 6, 7, 8]])
    joint = JointModel(model, module, recycle_weight=0.3, unroll_steps=1)
    loss, m = joint(x)
    logits, h = model(x)
    ce_full = F.cross_entropy(logits[0, :3], torch.tensor([6, 7, 8]))
    l_a, _ = module(model, torch.tensor([[6]]), h[:, 0:1])  # first pair, position 0
    both, _ = module(model, torch.tensor([[6, 7]]), h[:, 0:2])  # second pair sees the first causally
    ce_mod = F.cross_entropy(torch.stack([l_a[0, 0], both[0, 1]]), torch.tensor([7, 8]))
    torch.testing.assert_close(m["ce_full"], ce_full)
    torch.testing.assert_close(m["ce_module_1"], ce_mod)
    torch.testing.assert_close(loss, ce_full + 0.3 * ce_mod)


@torch.no_grad()
def test_no_leak_from_future_tokens():
    cfg, model, module = tiny_pair(5)
    x = torch.randint(0, cfg.model.vocab_size, (1, 14))
    t = 6
    y = x.clone()
    y[:, t + 2:] = torch.randint(0, cfg.model.vocab_size, (1, 14 - t - 2))
    outs = []
    for seq in (x, y):
        _, h = model(seq)
        outs.append(module.forward_unrolled(model, seq, h, 2))
    # Step 1 at index <= t reads x_{<= t+1}; step 2 at index <= t-1 reads x_{<= t+1}.
    torch.testing.assert_close(outs[0][0][:, : t + 1], outs[1][0][:, : t + 1])
    torch.testing.assert_close(outs[0][1][:, :t], outs[1][1][:, :t])
    assert not torch.allclose(outs[0][0][:, t + 1:], outs[1][0][:, t + 1:])


def _opts(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=[str(data)], out=str(out), preset="tiny", progress=False,
                overrides=dict(bf16=False, batch_size=4, seq_len=32, eval_every=1000, save_every=1000,
                               eval_batches=1, warmup_steps=2),
                model_overrides=dict(vocab_size=320))
    base.update(kw)
    return TrainOptions(**base)


def test_resume_matches_straight_run(text_dir, tmp_path):
    straight = tmp_path / "straight"
    train(_opts(text_dir, straight, max_steps=8))
    split = tmp_path / "split"
    train(_opts(text_dir, split, max_steps=8, stop_at_step=4))
    assert json.loads((split / "checkpoint" / "train_state.json").read_text())["step"] == 4
    train(_opts(text_dir, split, max_steps=8, resume=True))
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(split / "checkpoint" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [r["loss"] for r in read_metrics(straight, "train") if r["step"] == 8]
    lb = [r["loss"] for r in read_metrics(split, "train") if r["step"] == 8]
    assert abs(la[0] - lb[0]) < 1e-6


def test_out_dir_guards(text_dir, tmp_path):
    out = tmp_path / "run"
    train(_opts(text_dir, out, max_steps=2))
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(RecycleError, match="already holds a run"):
        train(_opts(text_dir, out, max_steps=2))
    with pytest.raises(RecycleError, match="different run"):
        train(_opts(text_dir, out, max_steps=2, resume=True, preset="small"))
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RecycleError, match="not empty"):
        train(_opts(text_dir, other, max_steps=2))
    assert (other / "notes.txt").read_text() == "mine"


def test_bad_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(RecycleError, match="no text"):
        train(_opts(empty, tmp_path / "r1", max_steps=1))
    with pytest.raises(RecycleError, match="not found"):
        train(_opts(tmp_path / "missing", tmp_path / "r2", max_steps=1))


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.environ.get("VIRTUAL_ENV"),
                    reason="accelerate launcher missing")
@pytest.mark.slow
def test_data_parallel_two_processes_stay_equal(text_dir, tmp_path):
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "recyclegpt.cli", "train",
           "--data", str(text_dir), "--out", str(out), "--preset", "tiny", "--max-steps", "4",
           "--batch-size", "2", "--seq-len", "32", "--vocab-size", "320", "--fp32", "--no-progress",
           "--eval-every", "1000", "--save-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    end = read_metrics(out, "end")[-1]
    sums = end["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert read_metrics(out, "start")[0]["processes"] == 2
