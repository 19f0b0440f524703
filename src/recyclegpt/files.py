"""Writing files and directories atomically: a reader sees the old version or the new one, never half of one.

Files go to a temporary sibling renamed over the target (`atomic_write_text`); directories (checkpoints,
exports, run state) are built in a temporary sibling named with the writer's process id and swapped in with
renames (`make_temp_dir`, `replace_dir`, `atomic_dir`), and what a killed writer left is cleaned up or moved
back by the next one (`clean_stale_temps`, `recover_dir`). Everything in the package that writes a file
uses these; this module imports nothing of the package but its errors and path checks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .paths import check_output_dir


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a written file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy(src: Path, dst: Path) -> None:
    """Put an unchanged file of an existing checkpoint into a new one (`save_checkpoint`'s write_extra)."""
    try:
        os.link(src, dst)  # safetensors files are never modified in place: a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def old_copy(path: Path) -> Path:
    """Where `replace_dir` keeps the previous `path` between its two renames."""
    return path.with_name(f".{path.name}.old")


def make_temp_dir(path: Path) -> Path:
    """A temporary sibling of `path` to build its next version in; the name carries this process's id,
    so `clean_stale_temps` can tell a dead writer's leftovers from a live one's work."""
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))


def clean_stale_temps(path: Path) -> None:
    """Remove temporary siblings of `path` left by writers that died (killed during a save or export)."""
    prefix = f".{path.name}.tmp"
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    for p in siblings:
        pid = p.name[len(prefix):].lstrip("-").split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def recover_dir(path: Path, complete: Callable[[Path], bool]) -> bool:
    """After a crash inside `replace_dir`: when `path` is missing and its old copy is `complete`,
    move the old copy back (True). A stale old copy next to an intact `path` is removed."""
    old = old_copy(path)
    if not old.exists():
        return False
    if not path.exists():
        if not complete(old):
            return False
        os.replace(old, path)
        return True
    if complete(path):
        shutil.rmtree(old, ignore_errors=True)
    return False


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path`, replacing what is there with renames only.

    Between the two renames only the old copy (`old_copy(path)`) holds the previous version;
    `recover_dir` moves it back after a crash in that window."""
    if path.exists():
        old = old_copy(path)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
        shutil.rmtree(old_copy(path), ignore_errors=True)  # an older copy a crash left: superseded now


@contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to build its next version in; on success it is made readable by
    others (`make_shareable`) and replaces `path` with renames only (`replace_dir`), on failure it is removed.
    Checkpoints are saved through this; `atomic_dir` adds the checks an export needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        make_shareable(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir` in one rename.

    Only a missing or empty directory, or an earlier export, is replaced (never a run or a checkpoint);
    temporary directories that killed exports left next to `out_dir` are removed."""
    check_output_dir(out_dir, None, overwrite=overwrite, overwrite_flag="overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    with replacing_dir(out_dir) as tmp:
        yield tmp


def make_shareable(root: Path) -> None:
    """Directories 0755, files 0644, like a `save_pretrained` output or `save_checkpoint`: mkdtemp makes
    the directory 0700 (and copied files keep their source's mode), so an engine running as another user
    could not read the export otherwise. Symbolic links are left alone."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        p.chmod(0o755 if p.is_dir() else 0o644)
