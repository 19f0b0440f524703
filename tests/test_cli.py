"""The command line end to end on a tiny run: train, generate, eval, and one-line errors (exit 2)."""

from __future__ import annotations

import pytest

from recyclegpt.cli import build_parser, main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import CORPUS_LINES

    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.txt").write_text("\n".join(CORPUS_LINES * 8))
    out = root / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
               "--batch-size", "2", "--seq-len", "32", "--vocab-size", "320", "--no-progress", "--fp32"])
    assert rc == 0
    return out, data


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_help_explains_every_command(capsys):
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("train", "generate", "eval", "demo"):
        assert name in names
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "usage: recyclegpt " + name in out
        for action in names[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("mode", ["ar", "recycle", "verify"])
def test_generate_modes(run_dir, capsys, mode):
    out, _ = run_dir
    rc = main(["generate", str(out), "--prompt", "def add(a, b):", "--mode", mode, "--max-new-tokens", "6",
               "--dtype", "float32", "--stats"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):")
    assert f"[{mode}]" in captured.err


def test_generate_stream_and_batch(run_dir, capsys):
    out, _ = run_dir
    assert main(["generate", str(out), "--prompt", "for i in", "--stream", "--max-new-tokens", "5",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("for i in")
    assert main(["generate", str(out), "--prompt", "a", "--prompt", "def f(x):", "--max-new-tokens", "4",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.count("--- [") == 2


def test_eval_reports_both_perplexities(run_dir, capsys, tmp_path):
    out, data = run_dir
    assert main(["eval", str(out), "--data", str(data), "--max-tokens", "2000",
                 "--json", str(tmp_path / "q.json")]) == 0
    text = capsys.readouterr().out
    assert "perplexity, standard" in text and "perplexity, recycle" in text
    assert (tmp_path / "q.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["generate", "{missing}", "--prompt", "x"], "checkpoint not found"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{run}", "--prompt", "x", "--top-p", "0"], "--top-p"),  # the flag, not the API argument
    (["generate", "{run}", "--prompt", "x", "--top-k", "-2"], "--top-k"),
    (["generate", "{run}", "--prompt", "word " * 400], "limit"),
    (["generate", "{run}", "--prompt", ""], "empty"),
    (["eval", "{run}", "--data", "{missing}"], "not found"),
    (["train", "--data", "{data}", "--out", "{run}", "--preset", "tiny"], "already holds a run"),
    (["train", "--data", "{data}", "--out", "{fresh}", "--preset", "nope"], "unknown preset"),
])
def test_bad_input_is_one_line_exit_2(run_dir, capsys, tmp_path, args, message):
    out, data = run_dir
    subst = {"{run}": str(out), "{data}": str(data), "{missing}": str(tmp_path / "missing"),
             "{fresh}": str(tmp_path / "fresh")}
    args = [subst.get(a, a) for a in args]
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    assert main(args) == 2
    assert message in one_line_error(capsys)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


def test_demo_train_runs_the_three_shipped_phases(tmp_path, monkeypatch):
    """`recyclegpt demo --train` = the commands in the shipped MODEL_CARD.md, resumable phase by phase."""
    from recyclegpt import demo

    calls = []
    monkeypatch.setattr(demo.subprocess, "call", lambda args: calls.append(args[3:]) or 0)
    assert demo.train_shipped(str(tmp_path)) == 0
    assert [c[0] for c in calls] == ["train", "attach", "attach"]
    assert calls[2][calls[2].index("--init-from-checkpoint") + 1] == str(tmp_path / "distill" / "checkpoint")
    assert "--distill-kl" in calls[2] and not any("--resume" in c for c in calls)
    card = (demo.shipped_checkpoint() / "MODEL_CARD.md").read_text()
    assert " ".join(demo.SHIPPED_SOFT_ARGS) in card and " ".join(demo.SHIPPED_TRAIN_ARGS) in card
    (tmp_path / "joint").mkdir()
    (tmp_path / "joint" / "run.json").write_text("{}")
    calls.clear()
    demo.train_shipped(str(tmp_path))
    assert "--resume" in calls[0] and "--resume" not in calls[1]


def test_tune_then_generate_tree_auto_uses_the_cached_choice(run_dir, capsys, tmp_path, monkeypatch):
    from recyclegpt.decoding import auto
    from recyclegpt.decoding.auto import DraftShape

    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "CANDIDATES", (DraftShape(2), DraftShape(3, 4)))
    out, _ = run_dir
    pfile = tmp_path / "p.txt"
    pfile.write_text("def add(a, b):\nfor i in range(3):\n")
    assert main(["tune", str(out), "--prompts", str(pfile), "--num-prompts", "2", "--max-new-tokens", "8",
                 "--repeats", "1", "--dtype", "float32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "chain k=2" in printed and "tree 4 (depth 3)" in printed and "<- --tree auto" in printed
    assert (tmp_path / "auto.json").is_file()
    assert main(["generate", str(out), "--prompt", "def add(a, b):", "--tree", "auto", "--max-new-tokens", "6",
                 "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):") and "note: auto: " in captured.err and "cached" in captured.err
    assert main(["generate", str(out), "--prompt", "x", "--tree", "auto", "--mode", "ar"]) == 2
    assert "--tree auto chooses a verify draft" in one_line_error(capsys)
    assert main(["generate", str(out), "--prompt", "x", "--tree", "bushy"]) == 2
    assert "--tree" in one_line_error(capsys)
