"""Fault suite: file-system faults, paths that would delete data, debris of failed starts, crashes inside a
checkpoint replacement, non-finite losses, and SIGINT/SIGTERM during training.

Every refused command: exit code 2, one `error:` line on stderr, no traceback, every file that existed
before byte-identical afterwards (and nothing added), and the refusal before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CORPUS_LINES, load_benchmark
from safetensors.torch import load_file

import recyclegpt.checkpoint as checkpoint_mod
from recyclegpt.cli import main
from recyclegpt.errors import Interrupted, RecycleError
from recyclegpt.paths import check_input, check_output_dir, check_output_file
from recyclegpt.training import TrainOptions, read_metrics, train
from recyclegpt.training.joint import JointModel
from recyclegpt.training.rundir import START_MARK, StopSignals

TRAIN_ARGS = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "320", "--fp32",
              "--no-progress", "--eval-every", "1000"]


def tree(*roots: Path) -> dict[str, str]:
    """Every file and directory under `roots`: path -> sha256 of its bytes ('dir' for directories)."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, filenames in os.walk(root):
            out[dirpath] = "dir"
            for f in filenames:
                p = os.path.join(dirpath, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else "other"
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained run (3 steps) plus a data directory, a plain file, a full and an empty directory."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.txt").write_text("\n".join(CORPUS_LINES * 8) + f"\n# {i}\n")
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "3", *TRAIN_ARGS]) == 0
    (root / "afile.txt").write_text("just a file\n")
    (root / "adir").mkdir()
    (root / "adir" / "notes.txt").write_text("mine\n")
    (root / "empty").mkdir()
    return {"root": root, "data": data, "run": run, "afile": root / "afile.txt", "adir": root / "adir",
            "empty": root / "empty"}


@pytest.fixture
def no_work(monkeypatch):
    """Any command that gets past its checks fails the test: refusals must come before the work."""
    def work(*a, **k):
        raise AssertionError("the command started its work before refusing")

    import recyclegpt.cli
    import recyclegpt.hf
    import recyclegpt.training.attach
    import recyclegpt.training.loop

    monkeypatch.setattr(recyclegpt.cli, "load_model", work)
    monkeypatch.setattr(recyclegpt.hf, "export_hf", work)
    monkeypatch.setattr(recyclegpt.hf, "export_eagle", work)
    monkeypatch.setattr(recyclegpt.training.loop, "_train", work)
    monkeypatch.setattr(recyclegpt.training.attach, "_attach", work)


# Placeholders: {run} {data} {afile} {adir} {empty} {root} {new} (a path that does not exist yet).
PATH_FAULTS = [
    # --- class 3: output paths, checked before the work ---
    (["eval", "{run}", "--json", "{adir}"], "is a directory"),
    (["eval", "{run}", "--json", "{afile}/q.json"], "is a file, not a directory"),
    (["eval", "{run}", "--json", "{afile}/a/b/q.json"], "is a file, not a directory"),
    (["eval", "{run}", "--json", ""], "empty path"),
    (["eval", "{run}", "--json", "/dev/null"], "not a regular file"),
    (["eval", "{run}", "--json", "{run}/checkpoint/config.json"], "lies inside the checkpoint"),
    (["eval", "{run}", "--json", "{run}/checkpoint"], "is a directory"),
    (["eval", "{run}", "--data", "{data}/0.txt", "--json", "{data}/0.txt"], "is a --data file"),
    (["bench", "{run}", "--json", "{adir}"], "is a directory"),
    (["bench", "{run}", "--plot", "{afile}/p.png"], "is a file, not a directory"),
    (["bench", "{run}", "--json", "{new}/same", "--plot", "{new}/same"], "same file"),
    (["bench", "{run}", "--json", "{run}/checkpoint/model.safetensors"], "lies inside the checkpoint"),
    (["train", "--data", "{data}", "--out", "{afile}", *TRAIN_ARGS], "is a file, not a directory"),
    (["train", "--data", "{data}", "--out", "{afile}/run", *TRAIN_ARGS], "is a file, not a directory"),
    (["train", "--data", "{data}", "--out", "", *TRAIN_ARGS], "empty path"),
    (["attach", "{run}", "--data", "{data}", "--out", "{afile}"], "is a file, not a directory"),
    (["export", "{run}", "--format", "hf", "--out", "{afile}"], "is a file, not a directory"),
    (["export", "{run}", "--format", "hf", "--out", "{afile}/x"], "is a file, not a directory"),
    (["export", "{run}", "--format", "eagle", "--out", "{adir}"], "already exists"),
    (["export", "{run}", "--format", "all", "--out", "{adir}"], "already exists"),
    # --- class 3: input paths ---
    (["eval", "{run}", "--data", "{afile}/x"], "not found"),
    (["eval", "{run}", "--data", "/dev/null"], "neither a file nor a directory"),
    (["eval", "{run}", "--data", "{empty}"], "no files matching"),
    (["eval", "{afile}"], "is a file, not a directory"),
    (["eval", "{new}"], "not found"),
    (["bench", "{run}", "--prompts", "{adir}"], "directory"),
    (["bench", "{afile}/x"], "not found"),
    (["train", "--data", "{afile}/x", "--out", "{new}", *TRAIN_ARGS], "not found"),
    (["train", "--data", "/dev/null", "--out", "{new}", *TRAIN_ARGS], "neither a file nor a directory"),
    (["train", "--data", "{empty}", "--out", "{new}", *TRAIN_ARGS], "no files matching"),
    (["train", "--data", "{data}", "--out", "{new}", "--tokenizer", "{afile}/t.json", *TRAIN_ARGS], "not found"),
    (["attach", "{afile}/x", "--data", "{data}", "--out", "{new}"], "not found"),
    (["attach", "{afile}", "--data", "{data}", "--out", "{new}"], "is a file, not a directory"),
    (["attach", "{run}", "--data", "{data}", "--out", "{new}", "--init-from-checkpoint", "{afile}"],
     "is a file, not a directory"),
    (["attach", "{run}", "--data", "{empty}", "--out", "{new}"], "no files matching"),
    # --- class 5: never replace or delete a directory that holds or lies inside the source ---
    (["export", "{run}", "--format", "hf", "--out", "{run}", "--overwrite"], "the checkpoint"),
    (["export", "{run}", "--format", "eagle", "--out", "{run}", "--overwrite"], "the checkpoint"),
    (["export", "{run}", "--format", "all", "--out", "{run}", "--overwrite"], "the checkpoint"),
    (["export", "{run}/checkpoint", "--format", "hf", "--out", "{run}", "--overwrite"], "holds the checkpoint"),
    (["export", "{run}", "--format", "hf", "--out", "{run}/checkpoint", "--overwrite"], "the checkpoint"),
    (["export", "{run}", "--format", "hf", "--out", "{root}", "--overwrite"], "holds the checkpoint"),
    (["export", "{run}", "--format", "hf", "--out", "/", "--overwrite"], "holds the checkpoint"),
    (["export", "{run}", "--format", "eagle", "--out", "{run}/checkpoint/draft"], "lies inside the checkpoint"),
    (["export", "{run}", "--format", "hf", "--out", "{run}/tokens", "--overwrite"], "lies inside the checkpoint"),
    (["export", "{run}", "--format", "hf", "--out", "{adir}", "--overwrite"], "not an earlier export"),
    (["export", "{run}", "--format", "hf", "--out", "{data}", "--overwrite"], "not an earlier export"),
    (["attach", "{run}", "--data", "{data}", "--out", "{run}"], "is the BASE path"),
    (["attach", "{run}", "--data", "{data}", "--out", "{run}/sub"], "lies inside the BASE path"),
    (["attach", "{run}/checkpoint", "--data", "{data}", "--out", "{run}", "--resume"], "holds the BASE path"),
    (["attach", "{run}", "--data", "{data}", "--out", "{data}/sub"], "lies inside the --data path"),
    (["train", "--data", "{data}", "--out", "{data}/run", *TRAIN_ARGS], "lies inside the --data path"),
    (["train", "--data", "{data}", "--out", "{root}", *TRAIN_ARGS], "holds the --data path"),
    (["train", "--data", "{data}", "--out", "{run}", *TRAIN_ARGS], "already holds a run"),
    (["train", "--data", "{data}", "--out", "{adir}", *TRAIN_ARGS], "not empty"),
    (["train", "--data", "{data}", "--out", "{new}", "--resume", *TRAIN_ARGS], "no run to resume"),
    (["train", "--data", "{data}", "--out", "{run}", "--resume", *TRAIN_ARGS, "--seq-len", "16"], "different run"),
]


@pytest.mark.parametrize("args, message", PATH_FAULTS, ids=[" ".join(a[:1] + a[2:6]) for a, _ in PATH_FAULTS])
def test_path_fault_is_one_line_and_changes_nothing(world, tmp_path, capsys, no_work, args, message):
    subst = {k: str(v) for k, v in world.items()} | {"new": str(tmp_path / "new")}
    argv = [a.format(**subst) for a in args]
    before = tree(world["root"], tmp_path)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line, line
    assert tree(world["root"], tmp_path) == before


def test_checks_of_the_paths_module(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    check_output_file(tmp_path / "new" / "deeper" / "a.json", "--json")  # missing parents are created later
    check_output_file(None, "--json")
    check_output_dir(tmp_path / "a" / "b", "--out", overwrite=False)
    with pytest.raises(RecycleError, match="--json .*: invalid path"):
        check_output_file("a\x00b", "--json")
    with pytest.raises(RecycleError, match="names a directory"):
        check_output_file(str(tmp_path / "nope") + "/", "--json")
    with pytest.raises(RecycleError, match="is a directory, not a file"):
        check_input(tmp_path, "--tokenizer", "file")
    with pytest.raises(RecycleError, match="holds a recyclegpt checkpoint"):
        d = tmp_path / "ck"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "module.safetensors").write_text("")
        check_output_dir(d, "--out", overwrite=True)
    assert not (tmp_path / "new").exists() and not (tmp_path / "a").exists()  # checks create nothing


def test_unreadable_is_reported_as_unreadable_not_corrupt(world, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    shutil.copytree(world["run"] / "checkpoint", ck)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_mod, "load_file", denied)
    with pytest.raises(RecycleError, match="cannot read weights file .*permission denied"):
        checkpoint_mod.load_checkpoint(ck)
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).endswith(".safetensors") else
                        real_access(p, m, **k))
    with pytest.raises(RecycleError, match=r"cannot read .*module\.safetensors.* not readable \(permission denied\)"):
        checkpoint_mod.load_checkpoint(ck)
    monkeypatch.setattr(os, "access", lambda p, m, **k: False)
    with pytest.raises(RecycleError, match="--tokenizer .*: not readable"):
        check_input(ck / "tokenizer.json", "--tokenizer", "file")
    with pytest.raises(RecycleError, match="cannot write in .*permission denied"):
        check_output_file(tmp_path / "q.json", "--json")
    from recyclegpt.data import resolve_files

    with pytest.raises(RecycleError, match="cannot read data file .*permission denied"):
        resolve_files([str(world["data"] / "0.txt")])


@pytest.mark.parametrize("args, message", [
    (["generate", "{afile}", "--prompt", "x"], "must be a directory"),
    (["generate", "{adir}", "--prompt", "x"], "not a complete checkpoint"),
    (["generate", "{afile}/x", "--prompt", "x"], "not found"),
])
def test_generate_input_faults(world, tmp_path, capsys, args, message):
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in args]
    before = tree(world["root"])
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert tree(world["root"]) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode bits say")
def test_real_permission_faults(world, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(world["run"] / "checkpoint", ck)
    (ck / "model.safetensors").chmod(0)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["generate", str(ck), "--prompt", "x"]) == 2
        assert "not readable" in one_error_line(capsys)
        assert main(["eval", str(world["run"]), "--json", str(ro / "q.json")]) == 2
        assert "permission denied" in one_error_line(capsys)
    finally:
        (ck / "model.safetensors").chmod(0o644)
        ro.chmod(0o755)


# ---- class 5: resume never restarts over a checkpoint; crashes inside a replacement -------------

def _resume_argv(data: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--resume", *TRAIN_ARGS]


FAULTS = load_benchmark("faults")  # benchmarks/faults.py: its fault helpers are the one copy


@pytest.mark.parametrize("how", ["no train_state.json", "train_state.json corrupt", "train_state.json without step",
                                 "train_state.safetensors corrupt", "no train_state.safetensors",
                                 "no model.safetensors", "model.safetensors is a directory", "no checkpoint",
                                 "only an incomplete old copy", "run.json corrupt", "run.json a list"])
def test_resume_refuses_a_run_whose_state_is_missing_or_corrupt(world, tmp_path, capsys, how):
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    FAULTS.break_run(out, how)
    before = tree(tmp_path)
    assert main(_resume_argv(world["data"], out, 5)) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line or "corrupt" in line, line
    assert tree(tmp_path) == before


def _opts(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=[str(data)], out=str(out), preset="tiny", progress=False,
                overrides=dict(bf16=False, batch_size=2, seq_len=32, eval_every=1000, save_every=2,
                               eval_batches=1, warmup_steps=2),
                model_overrides=dict(vocab_size=320))
    base.update(kw)
    return TrainOptions(**base)


class _Crash(BaseException):
    """A simulated power cut: nothing after it runs (no cleanup code catches a BaseException it does not know)."""


def test_crash_between_the_two_renames_then_resume_recovers_exactly(world, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_opts(world["data"], straight, max_steps=6))

    run = tmp_path / "run"
    real_replace = os.replace
    moved_aside = []

    def replace(src, dst):  # the save at step 4: crash after `checkpoint` -> `.checkpoint.old`
        if moved_aside:
            raise _Crash()
        real_replace(src, dst)
        if Path(dst).name == ".checkpoint.old" and json.loads(
                (Path(dst) / "train_state.json").read_text())["step"] == 2:
            moved_aside.append(dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", replace)
    with pytest.raises(_Crash):
        train(_opts(world["data"], run, max_steps=6))
    monkeypatch.undo()
    assert not (run / "checkpoint").exists() and (run / ".checkpoint.old").is_dir()
    stale = run / f".checkpoint.tmp-{2**22 + 7}-x"  # a temporary directory of a writer that died
    stale.mkdir()
    (stale / "junk").write_text("x")

    train(_opts(world["data"], run, max_steps=6, resume=True))
    assert [r["step"] for r in read_metrics(run, "start")] == [0, 2]  # resumed from the old copy's step 2
    assert not (run / ".checkpoint.old").exists() and not stale.exists()
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def test_stale_old_copy_next_to_an_intact_checkpoint_is_removed_on_resume(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    shutil.copytree(out / "checkpoint", out / ".checkpoint.old")
    (out / ".checkpoint.old" / "train_state.json").write_text('{"step": 1, "tokens_seen": 0}')
    assert main(_resume_argv(world["data"], out, 4)) == 0
    assert not (out / ".checkpoint.old").exists()
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 4


def test_failed_save_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    before = tree(out / "checkpoint")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_mod, "save_file", full)
    assert main(_resume_argv(world["data"], out, 5)) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert tree(out / "checkpoint") == before
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]


# ---- class 6: a failed start leaves nothing behind; a rerun goes on -----------------------------

def test_a_failed_start_leaves_nothing_and_a_rerun_goes_on(world, tmp_path, capsys):
    empty = tmp_path / "blank"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    out = tmp_path / "runs" / "r1"
    argv = ["train", "--data", str(empty), "--out", str(out), "--max-steps", "2", *TRAIN_ARGS]
    for _ in range(2):  # the same error twice: no "not empty" the second time
        assert main(argv) == 2
        assert "no text" in one_error_line(capsys)
        assert not out.exists() and not (tmp_path / "runs").exists()
    assert main(argv[:-len(TRAIN_ARGS)] + ["--resume", *TRAIN_ARGS]) == 2
    assert "no run to resume" in one_error_line(capsys)
    existing = tmp_path / "mine"  # an empty directory of the user's stays, empty
    existing.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(existing), "--max-steps", "2", *TRAIN_ARGS]) == 2
    assert existing.is_dir() and not any(existing.iterdir())
    argv[argv.index(str(empty))] = str(world["data"])
    assert main(argv) == 0
    assert (out / "checkpoint" / "train_state.json").is_file() and not (out / START_MARK).exists()


@pytest.mark.parametrize("resume", [False, True])
def test_leftovers_of_a_killed_start_do_not_block_a_rerun(world, tmp_path, capsys, resume):
    out = tmp_path / "run"
    out.mkdir()
    (out / START_MARK).write_text("")
    (out / "tokenizer.json").write_text("{}")
    (out / "tokens").mkdir()
    (out / "tokens" / ".train.bin.tmp").write_bytes(b"\x01")
    (out / "run.json").write_text("{}")
    (out / ".checkpoint.tmp-12-ab").mkdir()
    argv = ["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "2", *TRAIN_ARGS]
    assert main(argv + (["--resume"] if resume else [])) == 0
    assert "leftovers" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 2
    assert not (out / START_MARK).exists() and not (out / ".checkpoint.tmp-12-ab").exists()


def test_files_without_the_start_marker_are_never_cleared(world, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's own")
    before = tree(tmp_path)
    assert main(["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "2", *TRAIN_ARGS]) == 2
    assert "not empty" in one_error_line(capsys)
    assert tree(tmp_path) == before


# ---- class 4 (training): a non-finite loss stops the run and keeps the last good checkpoint -----

def _nan_after(monkeypatch, calls: int) -> None:
    real = JointModel.forward
    n = [0]

    def forward(self, *a, **k):
        loss, m = real(self, *a, **k)
        n[0] += 1
        return (loss * float("nan"), m) if n[0] > calls else (loss, m)

    monkeypatch.setattr(JointModel, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_after(monkeypatch, 3)  # steps 1-3 fine, step 4 NaN; saves every 2 steps
    with pytest.raises(RecycleError, match=r"step 4: the loss or its gradients are not finite.*step 2\)"):
        train(_opts(world["data"], out, max_steps=8))
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 2
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())

    fresh = tmp_path / "fresh"  # NaN before any checkpoint: one line, nothing left behind
    _nan_after(monkeypatch, 0)
    argv = ["train", "--data", str(world["data"]), "--out", str(fresh), "--max-steps", "3", *TRAIN_ARGS]
    assert main(argv) == 2
    assert "no checkpoint had been saved yet" in one_error_line(capsys)
    assert not fresh.exists()


# ---- class 7: SIGINT / SIGTERM save a checkpoint at the next step boundary ------------------------

@pytest.mark.slow
def test_sigint_in_a_real_process_saves_then_resume_continues(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "100000", *TRAIN_ARGS,
            "--save-every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recyclegpt.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not read_metrics_safe(out, "start") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)  # a few steps in
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGINT: checkpoint of step" in last and "--resume" in last, last
    saved = json.loads((out / "checkpoint" / "train_state.json").read_text())["step"]
    assert saved >= 1 and f"step {saved} " in last
    # the printed command, with a short --max-steps, continues from the saved step
    assert main(_resume_argv(world["data"], out, saved + 2)[:-len(TRAIN_ARGS)] + [*TRAIN_ARGS, "--save-every",
                                                                                  "100000"]) == 0
    assert [r["step"] for r in read_metrics(out, "start")] == [0, saved]
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == saved + 2


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_run_that_resumes_bit_identically(world, tmp_path):
    """Killed while saving every step (often inside a checkpoint replacement): --resume recovers the
    checkpoint, cleans up, and gives the weights of an uninterrupted run."""
    out = tmp_path / "run"
    args = ["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "100000", *TRAIN_ARGS,
            "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recyclegpt.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.4)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    def train_in_subprocess(run: Path, **kw) -> None:
        """train() with the killed run's settings, in a fresh process like it: float results of two processes
        (memory alignment picks the kernels' paths) are compared, never a process against this one."""
        o = dict(data=[str(world["data"])], out=str(run), preset="tiny", max_steps=100000, progress=False,
                 overrides=dict(batch_size=2, seq_len=32, eval_every=1000, save_every=1, bf16=False),
                 model_overrides=dict(vocab_size=320), **kw)
        code = ("import json, sys; from recyclegpt.training.loop import TrainOptions, train; "
                "train(TrainOptions(**json.loads(sys.argv[1])))")
        subprocess.run([sys.executable, "-c", code, json.dumps(o)], env=env, check=True, timeout=300,
                       stdout=subprocess.DEVNULL)

    logged = max([r["step"] for r in read_metrics_safe(out, "train")] + [0])  # every 10 steps: a lower bound
    ck = out / "checkpoint" if (out / "checkpoint").exists() else out / ".checkpoint.old"
    first = json.loads((ck / "train_state.json").read_text())["step"]
    assert first >= max(1, logged - 1)  # a step is logged just before its save
    train_in_subprocess(out, resume=True, stop_at_step=first + 2)
    assert [r["step"] for r in read_metrics(out, "start")] == [0, first]
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]
    straight = tmp_path / "straight"
    train_in_subprocess(straight, stop_at_step=first + 2)
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def read_metrics_safe(out: Path, event: str) -> list[dict]:
    try:
        return read_metrics(out, event)
    except (ValueError, OSError):  # a line being written
        return []


def _signal_at_step(monkeypatch, module, signum: int, at: int) -> None:
    """Deliver `signum` to this process in the middle of optimizer step `at` (1-based)."""
    real = module.optimizer_step
    n = [0]

    def step(*a, **k):
        n[0] += 1
        if n[0] == at:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(module, "optimizer_step", step)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_train_saves_at_the_step_boundary(world, tmp_path, monkeypatch, capsys, signum, code):
    import recyclegpt.training.loop as loop

    out = tmp_path / "run"
    handler = signal.getsignal(signum)
    _signal_at_step(monkeypatch, loop, signum, 3)
    argv = ["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "50", *TRAIN_ARGS]
    assert main(argv) == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"interrupted by {signal.Signals(signum).name}: checkpoint of step 3" in last
    assert last.endswith(f"continue with: recyclegpt {shlex.join([*argv, '--resume'])}"), last
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 3
    assert signal.getsignal(signum) is handler  # restored


def test_signal_before_the_loop_undoes_the_start(world, tmp_path, monkeypatch, capsys):
    import recyclegpt.training.loop as loop

    real = loop.prepare_tokens

    def prepare(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(loop, "prepare_tokens", prepare)
    out = tmp_path / "run"
    assert main(["train", "--data", str(world["data"]), "--out", str(out), "--max-steps", "5", *TRAIN_ARGS]) == 130
    assert "nothing new was saved" in capsys.readouterr().err
    assert not out.exists()


def test_signal_during_attach_saves_and_resume_continues(world, tmp_path, monkeypatch, capsys):
    import recyclegpt.training.attach as attach_mod

    out = tmp_path / "att"
    argv = ["attach", str(world["run"]), "--data", str(world["data"]), "--out", str(out), "--max-steps", "6",
            "--batch-size", "2", "--seq-len", "32", "--val-prompts", "0", "--fp32", "--no-progress"]
    _signal_at_step(monkeypatch, attach_mod, signal.SIGINT, 2)
    assert main(argv) == 130
    assert "checkpoint of step 2" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(out, "start")] == [0, 2]
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 6


def test_second_signal_or_one_outside_the_loop_raises_at_once():
    with StopSignals() as sig:
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.exit_code == 143
        sig.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert sig.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
