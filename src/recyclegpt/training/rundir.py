"""The run directory of `train` and `attach`: checked before any work, never lost, never left half-started.

- `RunDir.check()` (no side effects): --out is a writable directory (or can be made), does not hold
  or lie inside the run's inputs, and is new or empty; with --resume it holds this run with a
  complete checkpoint (config, weights, tokenizer, training state), or one whose previous copy
  survived a crash between the two renames of a checkpoint replacement. A run whose state is
  missing or corrupt is refused: resuming it would start at step 0 and overwrite its checkpoint.
- `RunDir.begin()`: a fresh start writes a marker (`.starting`) that the first checkpoint removes;
  a resume moves a surviving previous copy back and removes stale temporary directories.
- `RunDir.failed()`: a fresh start that fails before its first checkpoint removes what it wrote,
  so a rerun starts cleanly. Where even that could not run (SIGKILL), the marker tells a rerun
  that the leftovers are a start's own files, which it then clears.

`StopSignals`: SIGINT and SIGTERM during the training loop ask for a checkpoint at the next step
boundary, after which the run raises `Interrupted`; before the loop (or a second signal) they
raise it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import load_config
from ..errors import Interrupted, RecycleError, RecycleWarning
from ..files import clean_stale_temps, old_copy, recover_dir
from ..paths import check_output_dir, read_error

START_MARK = ".starting"
# What a start writes before its first checkpoint: the only entries a failed start may leave.
START_FILES = {"run.json", "tokenizer.json", "tokens", "metrics.jsonl", START_MARK}
STATE_FILES = ("train_state.json", "train_state.safetensors")


def checkpoint_problem(d: Path) -> str | None:
    """Why `d` is not a checkpoint training can resume from (None: it is one)."""
    if not d.is_dir():
        return f"{d} is missing"
    try:
        load_config(d)
    except RecycleError as e:
        return str(e)
    for f in STATE_FILES:
        if not (d / f).is_file():
            return f"{d} has no {f} (its training state)"
    try:
        info = json.loads((d / "train_state.json").read_text())
    except OSError as e:
        return str(read_error(d / "train_state.json", e))
    except ValueError:
        return f"{d / 'train_state.json'} is corrupt"
    if not (isinstance(info, dict) and isinstance(info.get("step"), int) and info["step"] >= 0
            and isinstance(info.get("tokens_seen"), int)):
        return f"{d / 'train_state.json'} is corrupt (no step / tokens_seen)"
    try:
        from safetensors import safe_open

        with safe_open(str(d / "train_state.safetensors"), "pt"):
            pass
    except PermissionError as e:
        return str(read_error(d / "train_state.safetensors", e))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        return f"{d / 'train_state.safetensors'} is corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _complete(d: Path) -> bool:
    return checkpoint_problem(d) is None


class RunDir:
    def __init__(self, out: str | Path, identity: dict[str, Any], resume: bool,
                 protect: list[tuple[str, str]] | None = None):
        self.given = out  # as given: "" is an error, not "."
        self.out, self.identity, self.resume = Path(out), identity, resume
        self.ckpt = self.out / "checkpoint"
        self.protect = protect or []
        self.fresh = not resume  # a new run (also: --resume of a start that never saved a checkpoint)
        self.clear_leftovers = False
        self.recover_old = False
        self.began = False
        self.saved_once = False
        self._created: Path | None = None  # the topmost directory begin() created

    # ---- before any work -------------------------------------------------------------------
    def check(self) -> None:
        check_output_dir(self.given, "--out", protect=self.protect)
        if self.failed_start():
            self.fresh, self.clear_leftovers = True, True
            return
        if self.resume:
            self._check_resume()
            return
        if (self.out / "run.json").is_file():
            raise RecycleError(f"{self.out} already holds a run: pass --resume to continue it, or choose another "
                               "--out")
        if self.out.exists() and any(self.out.iterdir()):
            raise RecycleError(f"{self.out} exists and is not empty; choose a new or empty --out directory")

    def failed_start(self) -> bool:
        """`out` holds only what a start that never saved a checkpoint wrote (with its marker)."""
        if not (self.out / START_MARK).is_file():
            return False
        tmp_prefix = f".{self.ckpt.name}.tmp"
        return all(e.name in START_FILES or e.name.startswith(tmp_prefix) for e in os.scandir(self.out))

    def _check_resume(self) -> None:
        run_json = self.out / "run.json"
        if not run_json.is_file():
            raise RecycleError(f"--resume: {self.out} holds no run to resume (no run.json); drop --resume to start "
                               "one")
        try:
            old = json.loads(run_json.read_text())
        except OSError as e:
            raise read_error(run_json, e) from None
        except ValueError:
            raise RecycleError(f"--resume: {run_json} is corrupt; this run cannot be resumed: start a new one in "
                               "another --out") from None
        if not isinstance(old, dict):
            raise RecycleError(f"--resume: {run_json} is corrupt; start a new run in another --out")
        if old != self.identity:
            diff = [k for k in self.identity if old.get(k) != self.identity[k]]
            raise RecycleError(f"--resume: {self.out} holds a different run (differs in: {', '.join(diff)})")
        problem = checkpoint_problem(self.ckpt)
        if problem is None:
            return
        old_ckpt = old_copy(self.ckpt)
        if not self.ckpt.exists() and old_ckpt.exists() and _complete(old_ckpt):
            self.recover_old = True  # a crash between the two renames of a checkpoint replacement
            return
        hint = (f"; a complete earlier checkpoint is in {old_ckpt}: move it to {self.ckpt} to resume from it"
                if old_ckpt.exists() and _complete(old_ckpt) else "")
        raise RecycleError(f"--resume: cannot resume {self.out}: {problem}; resuming would restart at step 0 and "
                           f"overwrite it, so nothing was changed (start a new run in another --out){hint}")

    # ---- the first write -------------------------------------------------------------------
    def begin(self) -> None:
        """Main process, before anything is written."""
        self.began = True
        if not self.fresh:
            if recover_dir(self.ckpt, _complete):
                warnings.warn(f"recovered the checkpoint of {self.out} from its previous copy (a save was "
                              "interrupted between its two renames)", RecycleWarning, stacklevel=2)
            clean_stale_temps(self.ckpt)
            (self.out / START_MARK).unlink(missing_ok=True)  # killed right after its first save
            return
        if self.clear_leftovers:
            warnings.warn(f"clearing the leftovers of a start in {self.out} that never saved a checkpoint",
                          RecycleWarning, stacklevel=2)
            self._remove_start_files()
        top = self.out
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self._created = top if not self.out.exists() else None
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / START_MARK).write_text("a run is starting here; its first checkpoint removes this file\n")

    def saved(self) -> None:
        """Main process, after each checkpoint."""
        if not self.saved_once:
            self.saved_once = True
            (self.out / START_MARK).unlink(missing_ok=True)

    def failed(self) -> None:
        """Main process, when the run fails: a fresh start that saved nothing leaves nothing behind."""
        if not (self.fresh and self.began and not self.saved_once):
            return
        self._remove_start_files()
        if self._created is not None:
            d = self.out
            while True:
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == self._created:
                    break
                d = d.parent

    def _remove_start_files(self) -> None:
        if not self.out.is_dir():
            return
        tmp_prefix = f".{self.ckpt.name}.tmp"
        for e in os.scandir(self.out):
            p = Path(e.path)
            if e.name in START_FILES - {START_MARK} or e.name.startswith(tmp_prefix):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        (self.out / START_MARK).unlink(missing_ok=True)  # last: a crash in between leaves it marked


class StopSignals:
    """SIGINT/SIGTERM handlers for a run (main thread only; a signal the process ignores stays ignored).

    Outside the loop a signal raises `Interrupted` at once; once `deferred` is set (the loop runs)
    the first one is recorded in `signum` for the loop to act on at the next step boundary, and a
    second raises at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.deferred and self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            warnings.warn(f"{name}: saving a checkpoint at the end of this step, then stopping ({name} again: "
                          "stop at once, keeping the last checkpoint)", RecycleWarning, stacklevel=2)
            return
        raise Interrupted(signum)


__all__ = ["RunDir", "StopSignals", "checkpoint_problem", "START_MARK"]
