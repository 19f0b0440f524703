"""File-system checks for every path a command reads or writes, made before any work starts.

Each check raises RecycleError with one line that names the flag and what is wrong (not found, a
file where a directory is expected, a directory where a file is expected, not readable, not
writable, inside the data it would replace), so a command never runs for minutes and then fails
on its output path, and never replaces or deletes a directory that holds or lies inside its source.

`check_output_file` / `check_output_dir` create nothing: missing parent directories are fine when
the nearest existing ancestor is a writable directory (the writer creates them).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import RecycleError

PathLike = str | os.PathLike


def _label(flag: str | None, path: PathLike) -> str:
    return f"{flag} {path}" if flag else str(path)


def _stat_kind(p: Path, label: str) -> str | None:
    """'dir', 'file', 'other' or None (does not exist); path syntax errors become RecycleError."""
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a component of the path is a file
        return None
    except PermissionError:
        raise RecycleError(f"{label}: permission denied (cannot look up this path)") from None
    except ValueError as e:  # embedded NUL byte
        raise RecycleError(f"{label}: invalid path ({e})") from None
    except OSError as e:
        raise RecycleError(f"{label}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


def _nearest_existing(p: Path, label: str) -> tuple[Path, str]:
    """The nearest existing ancestor of `p` (not `p` itself) and its kind."""
    cur = p.absolute().parent
    while True:
        kind = _stat_kind(cur, label)
        if kind is not None or cur.parent == cur:
            return cur, kind or "dir"
        cur = cur.parent


def _check_writable_parent(p: Path, label: str) -> None:
    anc, kind = _nearest_existing(p, label)
    if kind != "dir":
        raise RecycleError(f"{label}: {anc} is a file, not a directory")
    _check_writable_dir(anc, label)


def _check_writable_dir(d: Path, label: str) -> None:
    if not os.access(d, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(d) else "permission denied"
        raise RecycleError(f"{label}: cannot write in {d} ({why})")


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def resolved(path: PathLike) -> Path:
    """The absolute path with symlinks resolved as far as they exist (a path need not exist)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(path))


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_overlapping(out: PathLike, flag: str | None, protect: Iterable[tuple[PathLike, str]],
                          allow_inside: bool = False) -> None:
    """Refuse an output that is, holds, or (unless `allow_inside`) lies inside a protected path.

    `protect`: (path, what) pairs, e.g. (checkpoint, "the checkpoint"); paths compare resolved."""
    o = resolved(out)
    for src, what in protect:
        if src is None or str(src) == "":
            continue
        s = resolved(src)
        if o == s:
            raise RecycleError(f"{_label(flag, out)}: is {what} ({src}); choose another path")
        if _is_within(s, o):
            raise RecycleError(f"{_label(flag, out)}: holds {what} ({src}); choose a path outside it")
        if not allow_inside and _is_within(o, s):
            raise RecycleError(f"{_label(flag, out)}: lies inside {what} ({src}); choose a path outside it")


def check_output_file(path: PathLike | None, flag: str | None,
                      protect: Iterable[tuple[PathLike, str]] = ()) -> None:
    """A file about to be written (created or replaced): not a directory or device, its parent
    writable (or creatable), and not inside a protected path. None (flag not given) passes."""
    if path is None:
        return
    if str(path) == "":
        raise RecycleError(f"{flag}: empty path")
    p = Path(path)
    label = _label(flag, path)
    kind = _stat_kind(p, label)
    if kind == "dir":
        raise RecycleError(f"{label}: is a directory; give a file path")
    if kind == "other":
        raise RecycleError(f"{label}: is not a regular file (a device, pipe or socket); give a file path")
    if kind is None and str(path).endswith(os.sep):
        raise RecycleError(f"{label}: names a directory; give a file path")
    _check_writable_parent(p, label)
    check_not_overlapping(p, flag, protect)


def check_output_dir(path: PathLike, flag: str | None, *, overwrite: bool | None = None,
                     overwrite_flag: str = "--overwrite", protect: Iterable[tuple[PathLike, str]] = ()) -> None:
    """A directory about to be written.

    overwrite=None: written into (a run directory); it must be a writable directory if it exists.
    overwrite=False: must not exist. overwrite=True: replaced as a whole if it exists; then it must
    be a directory that is empty or holds an earlier export (config.json), never a run.
    `protect`: paths the output may neither be, hold, nor lie inside."""
    if str(path) == "":
        raise RecycleError(f"{flag}: empty path")
    p = Path(path)
    label = _label(flag, path)
    kind = _stat_kind(p, label)
    if kind is not None and kind != "dir":
        raise RecycleError(f"{label}: is a file, not a directory")
    check_not_overlapping(p, flag, protect)
    if kind is None:
        _check_writable_parent(p, label)
        return
    if overwrite is None:
        _check_writable_dir(p, label)
        return
    if not overwrite:
        raise RecycleError(f"{label}: already exists; choose another directory or pass {overwrite_flag}")
    entries = _entries(p, label)
    if "run.json" in entries or "checkpoint" in entries:
        raise RecycleError(f"{label}: holds a training run; {overwrite_flag} never replaces one: choose another "
                           "directory")
    if "module.safetensors" in entries:
        raise RecycleError(f"{label}: holds a recyclegpt checkpoint; {overwrite_flag} never replaces one: choose "
                           "another directory")
    if entries and "config.json" not in entries:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise RecycleError(f"{label}: holds files that are not an earlier export ({shown}); {overwrite_flag} "
                           "replaces only an export: choose another directory")
    _check_writable_parent(p, label)


def _entries(d: Path, label: str) -> set[str]:
    try:
        return {e.name for e in os.scandir(d)}
    except PermissionError:
        raise RecycleError(f"{label}: not readable (permission denied)") from None
    except OSError as e:
        raise RecycleError(f"{label}: {e.strerror or e}") from None


def check_input(path: PathLike, flag: str | None, kind: str = "any") -> None:
    """A path about to be read: it exists, has the expected kind ('file', 'dir' or 'any'), and is readable."""
    if str(path) == "":
        raise RecycleError(f"{flag}: empty path")
    p = Path(path)
    label = _label(flag, path)
    got = _stat_kind(p, label)
    if got is None:
        anc, akind = _nearest_existing(p, label)
        if akind != "dir":
            raise RecycleError(f"{label}: not found ({anc} is a file, not a directory)")
        raise RecycleError(f"{label}: not found")
    if kind == "file" and got == "dir":
        raise RecycleError(f"{label}: is a directory, not a file")
    if kind == "dir" and got != "dir":
        raise RecycleError(f"{label}: is a file, not a directory")
    mode = os.R_OK | (os.X_OK if got == "dir" else 0)
    if not os.access(p, mode):
        raise RecycleError(f"{label}: not readable (permission denied)")


def read_error(path: PathLike, e: OSError, what: str = "file") -> RecycleError:
    """A one-line error for an OSError met while reading `path`: unreadable is not corrupt."""
    if isinstance(e, PermissionError) or e.errno == errno.EACCES:
        return RecycleError(f"cannot read {what} {path}: permission denied")
    if isinstance(e, IsADirectoryError):
        return RecycleError(f"cannot read {what} {path}: it is a directory, not a file")
    if isinstance(e, FileNotFoundError):
        return RecycleError(f"cannot read {what} {path}: not found")
    return RecycleError(f"cannot read {what} {path}: {e.strerror or e}")


__all__ = ["check_input", "check_output_file", "check_output_dir", "check_not_overlapping", "read_error",
           "resolved"]
