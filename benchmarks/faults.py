"""Fault benchmark: run a few hundred bad command lines through `recyclegpt` and count how each one ends.

In a temporary directory it builds a small world: a tiny random checkpoint (`ck`), a tiny corpus, a tiny
training run (`run`, two steps of `recyclegpt train --preset tiny`), a bigger-than-the-model tokenizer,
a plain file, a directory of the user's, an empty directory. Each case may then build its own broken
input in a directory of its own (a checkpoint with a bad config field, NaN weights, a truncated
safetensors file, a run whose resume state is missing or corrupt, ...). Every case runs as a subprocess
(`python -m recyclegpt.cli ...`, OMP_NUM_THREADS=1, its own timeout), across every subcommand: generate,
train (and --resume), eval, bench, bench serve (a dead 127.0.0.1 URL on a closed port), serve (option
validation; the server never starts), export, attach, demo, and the top-level parser. lm-eval is not
covered: everything after `recyclegpt lm-eval` is lm-eval's own command line.

For each case it records the exit code, whether stdout or stderr holds a Python traceback, the lines on
stderr, and every file and directory under the temporary tree before and after (sha256 of each file):
a pre-existing file changed or removed, or a new file or directory left behind, counts as "files changed".

A case is a CLEAN ERROR when all of these hold:
  - the exit code is 2 (the one code `recyclegpt` documents for bad input; 130/143 are for signals);
  - stderr holds exactly one `error: ...` line, and it is the last line; any line before it must be a
    `note: ...` line (the command line prints each RecycleWarning that way, e.g. "note: removing
    leftovers of a start that did not finish") -- notes are allowed and counted;
  - no traceback, no timeout;
  - no file in the temporary tree changed, removed or added.
Each case also names a word its error line should contain (the flag or the fault); a clean error whose
line lacks it is listed as "off target" (information only: the error was clean, maybe not the right one).

Summary buckets: clean errors; tracebacks; unclean output (no traceback, but a wrong exit code, a timeout,
or stderr other than one error line); files changed (cases, whatever their output). The exit code is 0 when
no case printed a traceback and no case changed a file, else 1.

    python benchmarks/faults.py                     # every case (a few minutes: each case starts Python + torch)
    python benchmarks/faults.py --limit 10          # 10 cases spread over all subcommands
    python benchmarks/faults.py --only resume -v    # the cases whose id contains "resume", with their stderr
    python benchmarks/faults.py --json benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLEAN_CODES = {2}  # `recyclegpt`: 2 = bad input or a refused operation (cli.py); 130/143 = SIGINT/SIGTERM

TRAIN_ARGS = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "320", "--fp32",
              "--no-progress", "--eval-every", "1000", "--max-steps", "1"]
# Arguments that keep a command cheap should a bad input ever get past its checks.
GEN = ["--max-new-tokens", "1"]
BENCH = ["--modes", "ar", "--max-new-tokens", "1", "--repeats", "1", "--num-prompts", "1", "--compile", "none",
         "--no-progress"]
EVAL = ["--max-tokens", "64", "--seq-len", "32", "--agreement-tokens", "0"]
ATTACH = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--fp32", "--no-progress",
          "--val-prompts", "0", "--eval-every", "1000"]
SERVE = ["--no-compile", "--port", "{port}"]  # a closed port: a server that wrongly starts fails the timeout
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n",
    "Recyclable modules predict the token after next from the hidden state.",
    "In the morning the market opens; traders shout prices across the floor.",
    "for i in range(10):\n    print(i * i)\n",
]


# ---- cases ---------------------------------------------------------------------------------------

Setup = Callable[[dict[str, Path], Path], None]  # (world, the case's own directory) -> None


@dataclasses.dataclass
class Case:
    id: str
    group: str
    argv: list[str]  # placeholders {ck} {run} {data} ... (see World), {case} (the case's directory), {new}
    expect: str = ""  # a word its error line should contain
    setup: Setup | None = None


CASES: list[Case] = []


def case(group: str, id: str, argv: list[str], expect: str = "", setup: Setup | None = None) -> None:
    CASES.append(Case(f"{group}: {id}", group, argv, expect, setup))


# -- helpers that break things inside a case's own directory --

def _copy_ck(w: dict[str, Path], d: Path) -> Path:
    return Path(shutil.copytree(w["ck"], d / "ck"))


DELETE = object()


def set_field(cfg: dict, dotted: str, value: object) -> None:
    """Set the `dotted` field ("model.n_head") of a config dict to `value`; DELETE removes it
    (tests/test_validation.py breaks configs the same way)."""
    *parents, key = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    if value is DELETE:
        del cfg[key]
    else:
        cfg[key] = value


def edit_config(dotted: str, value: object) -> Setup:
    """A copy of the checkpoint with config.json's `dotted` field set to `value` (DELETE removes it)."""
    def setup(w: dict[str, Path], d: Path) -> None:
        ck = _copy_ck(w, d)
        cfg = json.loads((ck / "config.json").read_text())
        set_field(cfg, dotted, value)
        (ck / "config.json").write_text(json.dumps(cfg))  # NaN / Infinity as Python's json writes them
    return setup


def write_file(name: str, data: bytes | str) -> Setup:
    """A copy of the checkpoint with `name` replaced by `data`."""
    def setup(w: dict[str, Path], d: Path) -> None:
        ck = _copy_ck(w, d)
        (ck / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def remove_file(name: str, replace_by_dir: bool = False) -> Setup:
    def setup(w: dict[str, Path], d: Path) -> None:
        ck = _copy_ck(w, d)
        (ck / name).unlink()
        if replace_by_dir:
            (ck / name).mkdir()
    return setup


def truncate(name: str, keep: float | int) -> Setup:
    """A copy of the checkpoint with `name` cut to `keep` bytes (a float: that share of its size)."""
    def setup(w: dict[str, Path], d: Path) -> None:
        ck = _copy_ck(w, d)
        raw = (ck / name).read_bytes()
        (ck / name).write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])
    return setup


def poison_weights(name: str, how: str) -> Setup:
    """A copy of the checkpoint whose `name` has one value set to nan/inf/-inf, a tensor dropped or reshaped."""
    def setup(w: dict[str, Path], d: Path) -> None:
        from safetensors.torch import load_file, save_file

        ck = _copy_ck(w, d)
        state = load_file(str(ck / name))
        key = sorted(state)[-1]
        if how == "drop":
            del state[key]
        elif how == "reshape":
            state[key] = state[key].reshape(-1)[:-1].clone()
        elif how == "int32":
            state[key] = state[key].to(__import__("torch").int32)
        else:
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float(how)
        save_file(state, str(ck / name), metadata={"format": "pt"})
    return setup


def big_tokenizer(w: dict[str, Path], d: Path) -> None:
    ck = _copy_ck(w, d)
    shutil.copy(w["big_tokenizer"], ck / "tokenizer.json")


def _write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        p = run / rel
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return apply


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).unlink()


def _dir_in_place_of(rel: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / rel).unlink()
        (run / rel).mkdir()
    return apply


def _truncated(rel: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        raw = (run / rel).read_bytes()
        (run / rel).write_bytes(raw[: len(raw) // 2])
    return apply


def _checkpoint_a_file(run: Path) -> None:
    shutil.rmtree(run / "checkpoint")
    (run / "checkpoint").write_text("x")


def _only_incomplete_old_copy(run: Path) -> None:
    old = run / ".checkpoint.old"
    os.replace(run / "checkpoint", old)
    (old / "train_state.json").unlink()


# The ways `break_run` breaks a training run directory's resume state, in the order the resume cases run.
STATE, MODEL = "checkpoint/train_state", "checkpoint/model.safetensors"
RUN_BREAKS: dict[str, Callable[[Path], None]] = {
    "no train_state.json": _remove(f"{STATE}.json"),
    "train_state.json corrupt": _write(f"{STATE}.json", "{"),
    "train_state.json without step": _write(f"{STATE}.json", '{"tokens_seen": 3}'),
    "train_state.json step negative": _write(f"{STATE}.json", '{"step": -4, "tokens_seen": 3}'),
    "train_state.json a list": _write(f"{STATE}.json", "[]"),
    "train_state.safetensors corrupt": _write(f"{STATE}.safetensors", b"garbage"),
    "no train_state.safetensors": _remove(f"{STATE}.safetensors"),
    "no model.safetensors": _remove(MODEL),
    "model.safetensors is a directory": _dir_in_place_of(MODEL),
    "model.safetensors truncated": _truncated(MODEL),
    "checkpoint config.json corrupt": _write("checkpoint/config.json", "{"),
    "no checkpoint": lambda run: shutil.rmtree(run / "checkpoint"),
    "checkpoint is a file": _checkpoint_a_file,
    "only an incomplete old copy": _only_incomplete_old_copy,
    "run.json corrupt": _write("run.json", "[1,"),
    "run.json a list": _write("run.json", "[]"),
    "no run.json": _remove("run.json"),
}


def break_run(run: Path, how: str) -> None:
    """Break a training run directory's resume state in one way (`how`: a key of RUN_BREAKS;
    tests/test_faults.py breaks runs the same way)."""
    if how not in RUN_BREAKS:
        raise ValueError(how)
    RUN_BREAKS[how](run)


def broken_run(how: str) -> Setup:
    """A copy of the training run with its resume state broken in one way (`break_run`)."""
    def setup(w: dict[str, Path], d: Path) -> None:
        break_run(Path(shutil.copytree(w["run"], d / "run")), how)
    return setup


def _build_cases() -> None:  # noqa: C901 (a long list, read top to bottom)
    ck_gen = ["generate", "{case}/ck", "--prompt", "x", *GEN]

    # --- top-level parser ---
    case("cli", "unknown command", ["bogus"], "bogus")
    case("cli", "unknown option", ["--bogus"], "--bogus")
    case("cli", "generate without a checkpoint", ["generate"], "ckpt")
    case("cli", "generate without --prompt", ["generate", "{ck}"], "--prompt")
    case("cli", "generate unknown option", ["generate", "{ck}", "--prompt", "x", "--bogus"], "--bogus")
    case("cli", "train without --data", ["train", "--out", "{new}"], "--data")
    case("cli", "export without --format", ["export", "{ck}", "--out", "{new}"], "--format")

    # --- generate: numbers ---
    for flag, value in [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                        ("--temperature", "-inf"), ("--temperature", "hot"), ("--top-p", "0"), ("--top-p", "2"),
                        ("--top-p", "nan"), ("--top-p", "-0.5"), ("--top-k", "-1"), ("--top-k", "1.5"),
                        ("--max-new-tokens", "-1"), ("--max-new-tokens", "nan"), ("--max-new-tokens", "1e3"),
                        ("--k", "0"), ("--k", "-3"), ("--k", "65"), ("--k", str(10 ** 12)), ("--seed", str(2 ** 63)),
                        ("--seed", str(-2 ** 63 - 1)), ("--seed", "x"), ("--seed", ""), ("--temperature", "1e39"),
                        ("--top-k", str(2 ** 63))]:
        case("generate", f"{flag} {value!r}", ["generate", "{ck}", "--prompt", "x", *GEN, flag, value], flag)
    # --- generate: choices, text, device ---
    for flag, value, expect in [("--mode", "fast", "--mode"), ("--drafter", "magic", "--drafter"),
                                ("--device", "meta", "device"), ("--device", "foo", "device"),
                                ("--device", "cuda:99", "cuda"), ("--device", "\udcff", "device"),
                                ("--dtype", "float8", "dtype"), ("--dtype", "", "dtype"),
                                ("--prompt", "\udcff", "UTF-8"), ("--prompt", "abc\udc80", "UTF-8"),
                                ("--prompt", "ok \udcfe\udcff", "UTF-8"), ("--stop", "\udcff", "UTF-8"),
                                ("--stop", "", "--stop")]:
        case("generate", f"{flag} {value!r}", ["generate", "{ck}", "--prompt", "x", *GEN, flag, value], expect)
    case("generate", "five --stop strings", ["generate", "{ck}", "--prompt", "x", *GEN,
                                             *[a for t in "abcde" for a in ("--stop", t)]], "--stop")
    case("generate", "--stream with two prompts", ["generate", "{ck}", "--prompt", "a", "--prompt", "b", *GEN,
                                                   "--stream"], "--stream")
    # --- generate: checkpoint paths ---
    for what, path, expect in [("a file", "{afile}", "directory"), ("a directory of the user's", "{adir}",
                                                                    "checkpoint"),
                               ("an empty directory", "{empty}", "checkpoint"), ("under a file", "{afile}/x",
                                                                                 "not found"),
                               ("missing", "{new}", "not found"), ("not UTF-8", "{root}/no\udcffpe", "not found"),
                               ("empty path", "", "checkpoint"), ("/dev/null", "/dev/null", "directory")]:
        case("generate", f"checkpoint {what}", ["generate", path, "--prompt", "x", *GEN], expect)

    # --- bad checkpoints (through generate) ---
    for dotted, value in [("model.n_kv_head", 0), ("model.n_kv_head", -2), ("model.n_kv_head", "2"),
                          ("model.n_kv_head", 2.0), ("model.n_kv_head", None), ("model.n_kv_head", DELETE),
                          ("model.n_kv_head", 3), ("model.n_head", 0), ("model.dim", 0), ("model.dim", -64),
                          ("model.dim", True), ("model.dim", 10 ** 12), ("model.dim", [64]),
                          ("model.vocab_size", 0), ("model.vocab_size", "512"), ("model.n_layer", DELETE),
                          ("model.ffn_dim", -1), ("model.max_seq_len", 0), ("model.max_seq_len", 2 ** 40),
                          ("model.rope_theta", float("nan")), ("model.rope_theta", float("inf")),
                          ("model.rope_theta", -1.0), ("model.norm_eps", 0), ("model.norm_eps", float("-inf")),
                          ("model.tie_embeddings", "yes"), ("model.bogus", 1), ("module.n_layer", 0),
                          ("module.n_layer", 1.5), ("module.ffn_dim", "x"), ("module.final_norm", DELETE),
                          ("tokenizer.eos_token", 5), ("eos_token_id", -1), ("eos_token_id", 10 ** 9),
                          ("eos_token_id", DELETE), ("format_version", 99), ("format_version", "1"),
                          ("model", DELETE), ("model", []), ("module", 5), ("base", {"path": 3})]:
        shown = "DELETE" if value is DELETE else repr(value)
        case("checkpoint", f"config {dotted}={shown}", ck_gen, dotted.split(".")[-1], edit_config(dotted, value))
    for what, setup, expect in [
        ("config.json not JSON", write_file("config.json", "{"), "config.json"),
        ("config.json empty", write_file("config.json", ""), "config.json"),
        ("config.json a list", write_file("config.json", "[1, 2]"), "config.json"),
        ("config.json null", write_file("config.json", "null"), "config.json"),
        ("config.json not UTF-8", write_file("config.json", b'{"model": "\xff"}'), "config.json"),
        ("config.json missing", remove_file("config.json"), "config.json"),
        ("config.json a directory", remove_file("config.json", replace_by_dir=True), "config.json"),
        ("model.safetensors missing", remove_file("model.safetensors"), "model.safetensors"),
        ("module.safetensors missing", remove_file("module.safetensors"), "module.safetensors"),
        ("tokenizer.json missing", remove_file("tokenizer.json"), "tokenizer"),
        ("tokenizer.json not JSON", write_file("tokenizer.json", "not json"), "tokenizer"),
        ("tokenizer.json empty object", write_file("tokenizer.json", "{}"), "tokenizer"),
        ("tokenizer larger than the model", big_tokenizer, "600 tokens"),
        ("model.safetensors truncated to half", truncate("model.safetensors", 0.5), "model.safetensors"),
        ("model.safetensors truncated to 8 bytes", truncate("model.safetensors", 8), "model.safetensors"),
        ("model.safetensors empty", truncate("model.safetensors", 0), "model.safetensors"),
        ("module.safetensors truncated", truncate("module.safetensors", 0.9), "module.safetensors"),
        ("model.safetensors garbage header", write_file("model.safetensors", b"\xff" * 8 + b"{}"),
         "model.safetensors"),
        ("model.safetensors a directory", remove_file("model.safetensors", replace_by_dir=True),
         "model.safetensors"),
        ("NaN in model weights", poison_weights("model.safetensors", "nan"), "non-finite"),
        ("inf in model weights", poison_weights("model.safetensors", "inf"), "non-finite"),
        ("-inf in module weights", poison_weights("module.safetensors", "-inf"), "non-finite"),
        ("NaN in module weights", poison_weights("module.safetensors", "nan"), "non-finite"),
        ("a model tensor missing", poison_weights("model.safetensors", "drop"), "model.safetensors"),
        ("a model tensor of the wrong shape", poison_weights("model.safetensors", "reshape"), "model.safetensors"),
        ("a module tensor of the wrong dtype", poison_weights("module.safetensors", "int32"),
         "module.safetensors"),
    ]:
        case("checkpoint", what, ck_gen, expect, setup)
    # the same faults through the other commands that load a checkpoint
    nan_model = poison_weights("model.safetensors", "nan")
    case("checkpoint", "eval on NaN weights", ["eval", "{case}/ck", "--data", "{data}", *EVAL], "non-finite",
         nan_model)
    case("checkpoint", "bench on a truncated model", ["bench", "{case}/ck", "--prompts", "{prompts}", *BENCH],
         "model.safetensors", truncate("model.safetensors", 0.5))
    case("checkpoint", "export hf with n_kv_head 0", ["export", "{case}/ck", "--format", "hf", "--out", "{new}"],
         "n_kv_head", edit_config("model.n_kv_head", 0))
    case("checkpoint", "export eagle with config missing", ["export", "{case}/ck", "--format", "eagle", "--out",
                                                            "{new}"], "config.json", remove_file("config.json"))
    case("checkpoint", "attach on NaN weights", ["attach", "{case}/ck", "--data", "{data}", "--out", "{new}",
                                                 *ATTACH], "non-finite", nan_model)
    case("checkpoint", "serve on a truncated model", ["serve", "{case}/ck", *SERVE], "model.safetensors",
         truncate("model.safetensors", 0.5))
    case("checkpoint", "demo --ckpt with a bad config", ["demo", "--ckpt", "{case}/ck", "--max-new-tokens", "1"],
         "dim", edit_config("model.dim", -64))
    case("checkpoint", "generate on a run with a bad config",
         ["generate", "{case}/run", "--prompt", "x", *GEN], "config.json",
         broken_run("checkpoint config.json corrupt"))

    # --- train: numbers and options ---
    train = ["train", "--data", "{data}", "--out", "{new}", *TRAIN_ARGS]
    for flag, value in [("--lr", "nan"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "inf"), ("--max-minutes", "nan"),
                        ("--max-minutes", "-1"), ("--max-minutes", "0"), ("--val-fraction", "1"),
                        ("--val-fraction", "-0.1"), ("--val-fraction", "nan"), ("--recycle-weight", "nan"),
                        ("--recycle-weight", "-1"), ("--seq-len", "0"), ("--batch-size", "-2"),
                        ("--batch-size", "two"), ("--vocab-size", "0"), ("--vocab-size", str(10 ** 9)),
                        ("--vocab-size", "100"), ("--max-steps", "0"), ("--seed", "-5"), ("--grad-accum", "0"),
                        ("--unroll-steps", "0"), ("--eval-every", "0"), ("--save-every", "0"),
                        ("--module-layers", "0"), ("--text-field", "\udcff"), ("--preset", "huge")]:
        expect = "UTF-8" if value == "\udcff" else "huge" if value == "huge" else flag
        case("train", f"{flag} {value!r}", [*train, flag, value], expect)
    # --- train: paths, data, tokenizer ---
    for what, args, expect in [
        ("--out a file", ["--out", "{afile}"], "is a file"),
        ("--out under a file", ["--out", "{afile}/run"], "is a file"),
        ("--out not UTF-8 under a file", ["--out", "{afile}/\udcff"], "is a file"),
        ("--out empty", ["--out", ""], "empty path"),
        ("--out inside --data", ["--out", "{data}/run"], "--data"),
        ("--out holds --data", ["--out", "{root}"], "--data"),
        ("--out an existing run", ["--out", "{run}"], "run"),
        ("--out a directory of the user's", ["--out", "{adir}"], "not empty"),
        ("--data missing", ["--data", "{new}-data"], "not found"),
        ("--data under a file", ["--data", "{afile}/x"], "not found"),
        ("--data /dev/null", ["--data", "/dev/null"], "neither a file nor a directory"),
        ("--data an empty directory", ["--data", "{empty}"], "no files"),
        ("--data not UTF-8", ["--data", "{root}/\udcff"], "not found"),
        ("--data only empty files", ["--data", "{blank}"], "no text"),
        ("--data .jsonl without the field", ["--data", "{jsonl}", "--text-field", "body"], "body"),
        ("--data glob that matches nothing", ["--glob", "*.nothing"], "no files"),
        ("--tokenizer under a file", ["--tokenizer", "{afile}/t.json"], "not found"),
        ("--tokenizer not a tokenizer", ["--tokenizer", "{afile}"], "tokenizer"),
        ("--tokenizer a directory", ["--tokenizer", "{adir}"], "tokenizer"),
        ("--tokenizer larger than the model", ["--tokenizer", "{big_tokenizer}"], "--tokenizer"),
        ("--resume with no run", ["--resume"], "no run to resume"),
        ("--resume a different run", ["--out", "{run}", "--resume", "--seq-len", "16"], "different run"),
    ]:
        case("train", what, [*train, *args], expect)
    # --- train --resume on broken runs ---
    for how in RUN_BREAKS:
        case("resume", how, ["train", "--data", "{data}", "--out", "{case}/run", *TRAIN_ARGS[:-1], "3",
                             "--resume"], "corrupt" if how == "model.safetensors truncated" else "resume",
             broken_run(how))

    # --- eval ---
    ev = ["eval", "{run}", *EVAL]
    for what, args, expect in [
        ("--seq-len 0", ["--seq-len", "0"], "--seq-len"), ("--max-tokens -1", ["--max-tokens", "-1"], "--max-tokens"),
        ("--max-tokens nan", ["--max-tokens", "nan"], "--max-tokens"),
        ("--agreement-tokens -1", ["--agreement-tokens", "-1"], "--agreement-tokens"),
        ("--agreement-tokens beyond the context", ["--agreement-tokens", "100000"], "--agreement-tokens"),
        ("--json a directory", ["--json", "{adir}"], "directory"),
        ("--json under a file", ["--json", "{afile}/q.json"], "is a file"),
        ("--json not UTF-8 under a file", ["--json", "{afile}/\udcff.json"], "is a file"),
        ("--json empty", ["--json", ""], "empty path"),
        ("--json /dev/null", ["--json", "/dev/null"], "not a regular file"),
        ("--json inside the checkpoint", ["--json", "{run}/checkpoint/config.json"], "checkpoint"),
        ("--json onto its --data file", ["--data", "{data0}", "--json", "{data0}"], "--data"),
        ("--data under a file", ["--data", "{afile}/x"], "not found"),
        ("--data /dev/null", ["--data", "/dev/null"], "neither a file nor a directory"),
        ("--data an empty directory", ["--data", "{empty}"], "no files"),
        ("--prompts a directory", ["--agreement-tokens", "4", "--prompts", "{adir}"], "directory"),
        ("--prompts unknown", ["--agreement-tokens", "4", "--prompts", "{new}.txt"], "prompt"),
        ("--prompts not UTF-8", ["--agreement-tokens", "4", "--prompts", "{bad_utf8}"], "UTF-8"),
    ]:
        case("eval", what, [*ev, *args], expect)
    case("eval", "checkpoint a file", ["eval", "{afile}", *EVAL], "is a file")
    case("eval", "checkpoint missing", ["eval", "{new}", *EVAL], "not found")
    case("eval", "no --data and not a run", ["eval", "{ck}", *EVAL], "--data")

    # --- bench ---
    be = ["bench", "{ck}", *BENCH]
    for flag, value in [("--temperature", "nan"), ("--num-prompts", "-1"), ("--max-new-tokens", "0"),
                        ("--repeats", "0"), ("--seed", "-1"), ("--k", "0"), ("--batch-size", "0"),
                        ("--prompt-lookup", "0"), ("--modes", "fast"), ("--modes", ","), ("--hf-cache", "huge"),
                        ("--compile", "always")]:
        case("bench", f"{flag} {value!r}", [*be, flag, value], flag)
    case("bench", "--k 2 1000", [*be, "--k", "2", "1000"], "--k")
    for what, args, expect in [
        ("--json a directory", ["--json", "{adir}"], "directory"),
        ("--plot under a file", ["--plot", "{afile}/p.png"], "is a file"),
        ("--json and --plot the same file", ["--json", "{new}/same", "--plot", "{new}/same"], "same file"),
        ("--json inside the checkpoint", ["--json", "{ck}/model.safetensors"], "checkpoint"),
        ("--prompts a directory", ["--prompts", "{adir}"], "directory"),
        ("--prompts an empty file", ["--prompts", "{empty_file}"], "prompt"),
        ("--prompts not UTF-8", ["--prompts", "{bad_utf8}"], "UTF-8"),
        ("--prompts missing, not UTF-8", ["--prompts", "{root}/\udcff.txt"], "prompt"),
    ]:
        case("bench", what, [*be, *args], expect)
    case("bench", "checkpoint under a file", ["bench", "{afile}/x", *BENCH], "not found")

    # --- bench serve (a dead URL: nothing listens on the port) ---
    bs = ["bench", "serve", "--url", "http://127.0.0.1:{port}", "--num-requests", "1", "--max-tokens", "1",
          "--no-progress"]
    for what, args, expect in [
        ("dead server", [], "does not answer"),
        ("dead server, /v1 suffix", ["--url", "http://127.0.0.1:{port}/v1/"], "does not answer"),
        ("--url not http", ["--url", "ftp://127.0.0.1/x"], "--url"),
        ("--url not a URL", ["--url", "localhost"], "--url"),
        ("--url port out of range", ["--url", "http://127.0.0.1:99999"], "--url"),
        ("--url with a query", ["--url", "http://127.0.0.1:{port}/?q=1"], "--url"),
        ("--url not UTF-8", ["--url", "http://127.0.0.1:{port}/\udcff"], ""),
        ("--num-requests 0", ["--num-requests", "0"], "--num-requests"),
        ("--max-tokens -1", ["--max-tokens", "-1"], "--max-tokens"),
        ("--temperature nan", ["--temperature", "nan"], "--temperature"),
        ("--temperature -1", ["--temperature", "-1"], "--temperature"),
        ("--concurrency 0", ["--concurrency", "0"], "--concurrency"),
        ("--request-rate nan", ["--request-rate", "nan"], "--request-rate"),
        ("--concurrency and --request-rate", ["--concurrency", "2", "--request-rate", "1"], "--request-rate"),
        ("--duration 0", ["--duration", "0"], "--duration"),
        ("--timeout inf", ["--timeout", "inf"], "--timeout"),
        ("--seed -1", ["--seed", "-1"], "--seed"),
        ("--extra not JSON", ["--extra", "{mode"], "--extra"),
        ("--extra a list", ["--extra", "[1]"], "--extra"),
        ("--extra stream off", ["--extra", '{"stream": false}'], "stream"),
        ("--endpoint unknown", ["--endpoint", "embeddings"], "--endpoint"),
        ("--json a directory", ["--json", "{adir}"], "directory"),
        ("--plot under a file", ["--plot", "{afile}/p.png"], "is a file"),
        ("--prompts under a file", ["--prompts", "{afile}/x"], "prompt"),
        ("--prompts not UTF-8", ["--prompts", "{bad_utf8}"], "UTF-8"),
        ("--api-key not UTF-8", ["--api-key", "\udcff"], ""),
        ("--model not UTF-8", ["--model", "\udcff"], ""),
    ]:
        case("bench serve", what, [*bs, *args], expect)
    case("bench serve", "no --url", ["bench", "serve"], "--url")

    # --- serve: option validation (the server never starts) ---
    sv = ["serve", "{ck}", *SERVE]
    for flag, value in [("--port", "0"), ("--port", "70000"), ("--port", "-1"), ("--port", "http"),
                        ("--request-timeout", "nan"), ("--request-timeout", "0"), ("--request-timeout", "inf"),
                        ("--slots", "0"), ("--slots", str(10 ** 9)), ("--max-k", "0"), ("--max-k", "100"),
                        ("--k", "-1"), ("--max-queue", "0"), ("--max-body-bytes", "0"), ("--max-tokens-limit", "0"),
                        ("--host", "\udcff"), ("--model-name", "\udcff"), ("--api-key", "\udcff"),
                        ("--device", "foo"), ("--dtype", "float8")]:
        expect = "UTF-8" if value == "\udcff" else flag.removeprefix("--") if flag in ("--device", "--dtype") else flag
        case("serve", f"{flag} {value!r}", [*sv, flag, value], expect)
    case("serve", "--k above --max-k", [*sv, "--k", "5", "--max-k", "3"], "--max-k")
    case("serve", "checkpoint missing", ["serve", "{new}", *SERVE], "not found")
    case("serve", "checkpoint a file", ["serve", "{afile}", *SERVE], "directory")

    # --- export ---
    ex = ["export", "{run}"]
    for what, args, expect in [
        ("--format unknown", ["--format", "onnx", "--out", "{new}"], "--format"),
        ("--dtype unknown", ["--format", "hf", "--out", "{new}", "--dtype", "float8"], "--dtype"),
        ("--flavour unknown", ["--format", "eagle", "--out", "{new}", "--flavour", "tgi"], "--flavour"),
        ("--num-speculative-tokens 0", ["--format", "hf", "--out", "{new}", "--num-speculative-tokens", "0"],
         "--num-speculative-tokens"),
        ("--out a file", ["--format", "hf", "--out", "{afile}"], "is a file"),
        ("--out under a file", ["--format", "hf", "--out", "{afile}/x"], "is a file"),
        ("--out not UTF-8 under a file", ["--format", "hf", "--out", "{afile}/\udcff"], "is a file"),
        ("--out exists, eagle", ["--format", "eagle", "--out", "{adir}"], "already exists"),
        ("--out exists, all", ["--format", "all", "--out", "{adir}"], "already exists"),
        ("--out the run --overwrite, hf", ["--format", "hf", "--out", "{run}", "--overwrite"], "checkpoint"),
        ("--out the run --overwrite, eagle", ["--format", "eagle", "--out", "{run}", "--overwrite"], "checkpoint"),
        ("--out the run --overwrite, all", ["--format", "all", "--out", "{run}", "--overwrite"], "checkpoint"),
        ("--out the checkpoint --overwrite", ["--format", "hf", "--out", "{run}/checkpoint", "--overwrite"],
         "checkpoint"),
        ("--out inside the run --overwrite", ["--format", "hf", "--out", "{run}/tokens", "--overwrite"],
         "checkpoint"),
        ("--out inside the checkpoint", ["--format", "eagle", "--out", "{run}/checkpoint/draft"], "checkpoint"),
        ("--out holds the run --overwrite", ["--format", "hf", "--out", "{root}", "--overwrite"], "checkpoint"),
        ("--out a directory of the user's --overwrite", ["--format", "hf", "--out", "{adir}", "--overwrite"],
         "earlier export"),
        ("--out the data --overwrite", ["--format", "hf", "--out", "{data}", "--overwrite"], "earlier export"),
    ]:
        case("export", what, [*ex, *args], expect)
    case("export", "the checkpoint --out its run --overwrite",
         ["export", "{run}/checkpoint", "--format", "hf", "--out", "{run}", "--overwrite"], "checkpoint")
    case("export", "checkpoint under a file", ["export", "{afile}/x", "--format", "hf", "--out", "{new}"],
         "not found")

    # --- attach ---
    at = ["attach", "{ck}", "--data", "{data}", "--out", "{new}", *ATTACH]
    for flag, value in [("--distill-kl", "2"), ("--distill-kl", "nan"), ("--distill-kl", "-0.1"),
                        ("--val-prompts", "-1"), ("--lr", "inf"), ("--lr", "0"), ("--max-seq-len", "0"),
                        ("--val-fraction", "1"), ("--max-minutes", "nan"), ("--seed", "-1"),
                        ("--batch-size", "0"), ("--unroll-steps", "0"), ("--backend", "onnx"),
                        ("--base-dtype", "float8"), ("--text-field", "f\udce9")]:
        case("attach", f"{flag} {value!r}", [*at, flag, value], "UTF-8" if "\udce9" in value else flag)
    for what, argv, expect in [
        ("base missing", ["attach", "{afile}/x", "--data", "{data}", "--out", "{new}"], "not found"),
        ("base a file", ["attach", "{afile}", "--data", "{data}", "--out", "{new}"], "is a file"),
        ("base a directory of the user's", ["attach", "{adir}", "--data", "{data}", "--out", "{new}"], ""),
        ("--init-from-checkpoint a file", [*at, "--init-from-checkpoint", "{afile}"], "is a file"),
        ("--data an empty directory", ["attach", "{ck}", "--data", "{empty}", "--out", "{new}"], "no files"),
        ("--data only empty files", ["attach", "{ck}", "--data", "{blank}", "--out", "{new}", *ATTACH], "no text"),
        ("--out the base", ["attach", "{run}", "--data", "{data}", "--out", "{run}"], "BASE"),
        ("--out inside the base", ["attach", "{run}", "--data", "{data}", "--out", "{run}/sub"], "BASE"),
        ("--out holds the base, --resume",
         ["attach", "{run}/checkpoint", "--data", "{data}", "--out", "{run}", "--resume"], "BASE"),
        ("--out inside --data", ["attach", "{ck}", "--data", "{data}", "--out", "{data}/sub"], "--data"),
        ("--out a file", ["attach", "{ck}", "--data", "{data}", "--out", "{afile}"], "is a file"),
        ("--out a directory of the user's", ["attach", "{ck}", "--data", "{data}", "--out", "{adir}"], "not empty"),
        ("--resume with no run", [*at, "--resume"], "no run to resume"),
    ]:
        case("attach", what, argv, expect)

    # --- demo ---
    for what, args, expect in [
        ("--max-new-tokens 0", ["--max-new-tokens", "0"], "--max-new-tokens"),
        ("--max-new-tokens nan", ["--max-new-tokens", "nan"], "--max-new-tokens"),
        ("--max-new-tokens x", ["--max-new-tokens", "x"], "--max-new-tokens"),
        ("--ckpt missing", ["--ckpt", "{afile}/x", "--max-new-tokens", "1"], "not found"),
        ("--ckpt a file", ["--ckpt", "{afile}", "--max-new-tokens", "1"], "directory"),
        ("--ckpt a directory of the user's", ["--ckpt", "{adir}", "--max-new-tokens", "1"], "checkpoint"),
        ("--device foo", ["--ckpt", "{ck}", "--device", "foo", "--max-new-tokens", "1"], "device"),
        ("--dtype float8", ["--ckpt", "{ck}", "--dtype", "float8", "--max-new-tokens", "1"], "dtype"),
    ]:
        case("demo", what, ["demo", *args], expect)


_build_cases()


# ---- the world ---------------------------------------------------------------------------------

def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once by the OS, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    for k in ("RECYCLEGPT_API_KEY", "OPENAI_API_KEY"):
        env.pop(k, None)
    src = REPO / "src"
    if (src / "recyclegpt").is_dir():  # this checkout's package, whatever the current directory
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def build_world(root: Path, env: dict[str, str], timeout: float) -> dict[str, Path]:
    """Inputs shared by the cases (none of them may change them)."""
    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(1)
    from recyclegpt.checkpoint import save_checkpoint
    from recyclegpt.config import preset
    from recyclegpt.decoding.testing import random_models
    from recyclegpt.tokenizer import Tokenizer

    w = {"root": root}
    data = w["data"] = root / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.txt").write_text("\n".join(CORPUS * 8) + f"\n# {i}\n")
    w["data0"] = data / "0.txt"
    w["jsonl"] = root / "docs.jsonl"
    w["jsonl"].write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 4))
    w["blank"] = root / "blank"
    w["blank"].mkdir()
    (w["blank"] / "a.txt").write_text("")
    w["afile"] = root / "afile.txt"
    w["afile"].write_text("just a file\n")
    w["adir"] = root / "adir"
    w["adir"].mkdir()
    (w["adir"] / "notes.txt").write_text("mine\n")
    w["empty"] = root / "empty"
    w["empty"].mkdir()
    w["prompts"] = root / "prompts.txt"
    w["prompts"].write_text("def add(a, b):\nThe quick brown fox\n")
    w["empty_file"] = root / "empty.txt"
    w["empty_file"].write_text("")
    w["bad_utf8"] = root / "bad-utf8.txt"
    w["bad_utf8"].write_bytes(b"def f(\xff\xfe):\nok\n")

    cfg, _ = preset("tiny")  # the tiny checkpoint of tests/test_bench.py
    cfg.model = dataclasses.replace(cfg.model, tie_embeddings=False)
    model, module = random_models(seed=3, preset_name="tiny", scale=10.0)
    tok = Tokenizer.train(CORPUS * 20, vocab_size=400)
    cfg.eos_token_id = tok.eos_id
    w["ck"] = save_checkpoint(root / "ck", cfg, model, module, tok)
    big = Tokenizer.load(w["ck"] / "tokenizer.json")
    big.tok.add_tokens([f"<extra{i}>" for i in range(600 - big.vocab_size)])
    w["big_tokenizer"] = root / "big-tokenizer.json"
    big.save(w["big_tokenizer"])

    w["run"] = root / "run"
    argv = ["train", "--data", str(data), "--out", str(w["run"]), *TRAIN_ARGS[:-1], "2"]  # as the resume cases
    r = subprocess.run([sys.executable, "-m", "recyclegpt.cli", *argv], env=env, cwd=root, capture_output=True,
                       text=True, timeout=max(timeout, 300))
    if r.returncode != 0:
        raise SystemExit(f"faults.py: building the tiny training run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    w["cwd"] = root / "cwd"  # every case runs here: files a command writes to its current directory are seen
    w["cwd"].mkdir()
    (root / "cases").mkdir()
    return w


# ---- running and judging a case --------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def substitute(arg: str, names: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: names.get(m.group(1), m.group(0)), arg)


def snapshot(root: Path, cache: dict[tuple, str]) -> dict[str, str]:
    """Every path under root -> 'dir', 'link:TARGET', 'other' or the sha256 of the file's bytes. A file's hash
    is reused while its inode, size, mtime and ctime (which no write leaves unchanged) stay the same."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                key = (p, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if key not in cache:
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            h.update(block)
                    cache[key] = h.hexdigest()
                out[rel] = cache[key]
            else:
                out[rel] = "other"
    return out


def shown(s: str, root: Path) -> str:
    """Text safe to print and store: the temporary root as $TMP, bytes that are not UTF-8 as \\xNN."""
    s = s.replace(str(root), "$TMP")
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def judge(rc: int | None, timed_out: bool, out: str, err: str) -> dict:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    notes = [ln for ln in lines if ln.startswith("note: ")]
    traceback = "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out
    one_line = (len(errors) == 1 and bool(lines) and lines[-1] == errors[0]
                and len(notes) == len(lines) - 1)
    output_ok = not traceback and not timed_out and rc in CLEAN_CODES and one_line
    return {"traceback": traceback, "output_ok": output_ok, "stderr_lines": len(lines), "notes": len(notes),
            "first_line": errors[0] if errors else (lines[0] if lines else ""), "error_line": errors[-1] if errors
            else ""}


def run_case(c: Case, index: int, w: dict[str, Path], env: dict[str, str], timeout: float, keep: bool,
             cache: dict[tuple, str]) -> dict:
    root = w["root"]
    case_dir = root / "cases" / f"{index:03d}"
    names = {k: str(v) for k, v in w.items()} | {"case": str(case_dir), "new": str(root / f"fresh-{index:03d}"),
                                                 "port": str(closed_port())}
    if c.setup is not None:
        case_dir.mkdir()
        c.setup(w, case_dir)
    argv = [substitute(a, names) for a in c.argv]
    before = snapshot(root, cache)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "recyclegpt.cli", *argv], cwd=w["cwd"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    timed_out = False
    try:
        out_b, err_b = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out_b, err_b = proc.communicate()
    seconds = time.perf_counter() - t0
    after = snapshot(root, cache)
    changed = ([f"changed {p}" for p in before if p in after and after[p] != before[p]]
               + [f"removed {p}" for p in before if p not in after]
               + [f"added {p}" for p in after if p not in before])
    out, err = out_b.decode("utf-8", "backslashreplace"), err_b.decode("utf-8", "backslashreplace")
    verdict = judge(None if timed_out else proc.returncode, timed_out, out, err)
    if not keep:  # the case's own inputs, and whatever it left behind, go before the next case
        shutil.rmtree(case_dir, ignore_errors=True)
        for p in sorted((p.split(" ", 1)[1] for p in changed if p.startswith("added ")), key=len):
            full = root / p
            if full.is_dir() and not full.is_symlink():
                shutil.rmtree(full, ignore_errors=True)
            elif full.exists() or full.is_symlink():
                full.unlink()
    clean = verdict["output_ok"] and not changed
    expect_ok = not c.expect or c.expect.lower() in verdict["error_line"].lower()
    return {"id": shown(c.id, root), "group": c.group,
            "argv": shown(shlex.join(["recyclegpt", *argv]), root),
            "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out,
            "seconds": round(seconds, 2), "traceback": verdict["traceback"], "stderr_lines": verdict["stderr_lines"],
            "notes": verdict["notes"], "first_line": shown(verdict["first_line"], root)[:400],
            "files_changed": [shown(p, root) for p in changed], "clean": clean,
            "expect": c.expect, "message_on_target": expect_ok,
            **({"stderr_tail": shown(err[-2000:], root)} if not clean else {})}


def summarize(records: list[dict]) -> dict:
    return {
        "total": len(records),
        "clean_errors": sum(r["clean"] for r in records),
        "tracebacks": sum(r["traceback"] for r in records),
        "unclean_output": sum(not r["traceback"] and _bad_output(r) for r in records),
        "files_changed": sum(bool(r["files_changed"]) for r in records),
        "files_changed_paths": sum(len(r["files_changed"]) for r in records),
        "timeouts": sum(r["timed_out"] for r in records),
        "with_notes": sum(r["notes"] > 0 for r in records),
        "off_target": sum(r["clean"] and not r["message_on_target"] for r in records),
        "by_group": {g: {"total": sum(r["group"] == g for r in records),
                         "clean": sum(r["clean"] for r in records if r["group"] == g)}
                     for g in dict.fromkeys(r["group"] for r in records)},
    }


def _bad_output(r: dict) -> bool:
    """Output other than one error line with exit code 2 (whatever happened to the files)."""
    return (r["timed_out"] or r["exit_code"] not in CLEAN_CODES or r["stderr_lines"] - r["notes"] != 1
            or not r["first_line"].startswith("error: "))


def pick(cases: list[Case], limit: int | None) -> list[tuple[int, Case]]:
    """All cases, or `limit` of them spread evenly over the list (so a short run touches every subcommand)."""
    indexed = list(enumerate(cases))
    if limit is None or limit >= len(indexed):
        return indexed
    if limit <= 0:
        return []
    step = len(indexed) / limit
    return [indexed[int(i * step)] for i in range(limit)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


# ---- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="faults.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run bad inputs through the `recyclegpt` command line (one subprocess each) and count clean "
        "one-line errors, tracebacks, other output and changed files.",
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--limit", type=int, metavar="N", help="run N cases, spread evenly over all subcommands")
    p.add_argument("--only", metavar="TEXT", help="run only the cases whose id contains TEXT (case-insensitive)")
    p.add_argument("--list", action="store_true", help="list the cases (id and command template) and exit")
    p.add_argument("--json", metavar="OUT", help="write the report (settings, summary, every case) as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed) and "
                   "every case's own directory in it")
    p.add_argument("--verbose", "-v", action="store_true", help="print every case as it runs, and the stderr of "
                   "each case that is not clean")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds a case may run before it is killed and counted as unclean (default 120)")
    p.add_argument("--tmp", metavar="DIR", help="make the temporary directory inside DIR (default: the system's)")
    a = p.parse_args(argv)

    cases = [c for c in CASES if not a.only or a.only.lower() in c.id.lower()]
    chosen = pick(cases, a.limit)
    if a.list:
        for i, c in chosen:
            print(f"{i:3d}  {c.id}\n     recyclegpt {shlex.join(c.argv)}".encode("utf-8", "surrogateescape")
                  .decode("utf-8", "backslashreplace"))
        print(f"{len(chosen)} cases")
        return 0
    if a.json:  # fail now, not after the run
        Path(a.json).resolve().parent.mkdir(parents=True, exist_ok=True)
        a.json = str(Path(a.json).resolve())
    env = cli_env()
    root = Path(tempfile.mkdtemp(prefix="recyclegpt-faults-", dir=a.tmp)).resolve()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    records: list[dict] = []
    try:
        print(f"building the inputs in {root} ...", flush=True)
        w = build_world(root, env, a.timeout)
        cache: dict[tuple, str] = {}
        for n, (i, c) in enumerate(chosen, 1):
            r = run_case(c, i, w, env, a.timeout, a.keep, cache)
            records.append(r)
            if a.verbose or not r["clean"]:
                mark = "ok  " if r["clean"] else "FAIL"
                print(f"[{n:3d}/{len(chosen)}] {mark} {r['id']} ({r['exit_code']}, {r['seconds']:.1f}s): "
                      f"{r['first_line'][:160]}", flush=True)
                if a.verbose and not r["clean"]:
                    print("    $ " + r["argv"])
                    print("    " + r.get("stderr_tail", "").strip().replace("\n", "\n    "))
                    for f in r["files_changed"]:
                        print("    " + f)
            elif n % 25 == 0:
                print(f"[{n:3d}/{len(chosen)}] ...", flush=True)
    finally:
        if a.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    s = summarize(records)
    wall = time.perf_counter() - t0
    command = "python benchmarks/faults.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print()
    groups = ", ".join(f"{g} {v['total']}" for g, v in s["by_group"].items())
    print(f"cases:           {s['total']}  ({groups})")
    print(f"clean errors:    {s['clean_errors']}  (exit 2, one `error:` line on stderr, no file changed)")
    print(f"tracebacks:      {s['tracebacks']}")
    print(f"unclean output:  {s['unclean_output']}  (no traceback, but a wrong exit code, a timeout or more than "
          "one error line)")
    print(f"files changed:   {s['files_changed']}  (cases; {s['files_changed_paths']} paths changed, removed or "
          "left behind)")
    print(f"notes:           {s['with_notes']} clean errors had `note:` lines before the error")
    print(f"off target:      {s['off_target']} clean errors whose line lacks the word the case expects")
    bad = [r for r in records if not r["clean"]]
    if bad:
        print("\nnot clean:")
        for r in bad:
            why = ("traceback" if r["traceback"] else "timeout" if r["timed_out"] else
                   f"exit {r['exit_code']}, {r['stderr_lines']} stderr lines")
            print(f"  {r['id']} [{why}]: {r['first_line'][:200]}")
            print(f"    $ {r['argv']}")
            for f in r["files_changed"][:10]:
                print(f"    {f}")
    off = [r for r in records if r["clean"] and not r["message_on_target"]]
    if off:
        print("\noff target (clean, but the line lacks the expected word):")
        for r in off:
            print(f"  {r['id']} [expects {r['expect']!r}]: {r['first_line'][:200]}")
    print(f"\n{wall:.0f} s wall, {sum(r['seconds'] for r in records):.0f} s in the cases")

    if a.json:
        report = {"command": command, "date": started.strftime("%Y-%m-%d"), "started_utc": started.isoformat(),
                  "wall_s": round(wall, 1), "cpu": cpu_model(), "cores": os.cpu_count(),
                  "python": platform.python_version(), "platform": platform.platform(),
                  "clean_definition": "exit code in " + str(sorted(CLEAN_CODES)) + "; stderr: one `error:` line, "
                  "last, any other line a `note:` line; no traceback; no timeout; no file under the temporary tree "
                  "changed, removed or added",
                  "summary": s, "cases": records}
        Path(a.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"json: {a.json}")
    return 0 if s["tracebacks"] == 0 and s["files_changed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
