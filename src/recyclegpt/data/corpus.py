"""Find and read training documents: text files, directories (recursive, by glob) and JSONL.

Encoding policy: files are read as UTF-8; bytes that are not valid UTF-8 are replaced by U+FFFD
(counted and reported), so one odd file never stops a run. Files that look binary (a NUL byte
in their first 8 KiB) are skipped and counted.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RecycleError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Document:
    source: str  # file path (with ":line" for JSONL records)
    text: str


@dataclass
class ReadReport:
    files: int = 0
    skipped_binary: list[str] = field(default_factory=list)
    replaced_bytes: list[str] = field(default_factory=list)


def stdlib_files() -> list[Path]:
    """The Python standard library's own .py sources (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_top = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if parts[0] in skip_top or "tests" in parts or "test" in parts:
            continue
        out.append(f)
    return out


def resolve_files(paths: list[str | Path], glob: str = "**/*") -> list[Path]:
    """Expand files and directories into a sorted, de-duplicated file list."""
    if not paths:
        raise RecycleError("no data given: pass --data PATH (a file, a directory or a .jsonl file)")
    files: list[Path] = []
    for p in map(Path, paths):
        if str(p) == "stdlib":
            files.extend(stdlib_files())
        elif p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise RecycleError(f"cannot read data directory {p}: permission denied")
            found = sorted(f for f in p.glob(glob) if f.is_file() and not _hidden(f.relative_to(p)))
            if not found:
                raise RecycleError(f"no files matching {glob!r} under {p}")
            files.extend(found)
        elif p.is_file():
            if not os.access(p, os.R_OK):  # unreadable is not corrupt or empty: say so before any work
                raise RecycleError(f"cannot read data file {p}: permission denied")
            files.append(p)
        elif p.exists():
            raise RecycleError(f"data path {p} is neither a file nor a directory (a device, pipe or socket)")
        else:
            raise RecycleError(f"data path not found: {p}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_text(path: Path, report: ReadReport) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecycleError(f"cannot read data file {path}: {e.strerror}") from None
    if b"\x00" in raw[:8192]:
        report.skipped_binary.append(str(path))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.replaced_bytes.append(str(path))
        return raw.decode("utf-8", errors="replace")


def iter_documents(files: list[Path], text_field: str = "text", report: ReadReport | None = None
                   ) -> Iterator[Document]:
    report = report if report is not None else ReadReport()
    for f in files:
        text = _read_text(f, report)
        report.files += 1
        if text is None:
            continue
        if f.suffix in JSONL_SUFFIXES:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecycleError(f"{f}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise RecycleError(f"{f}:{i}: record has no string field {text_field!r} (set --text-field)")
                yield Document(f"{f}:{i}", rec[text_field])
        elif text.strip():
            yield Document(str(f), text)


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split: a stable hash of the document's text decides.

    Hashing content (not the path) makes the split the same wherever the corpus lives, and puts
    duplicate documents on the same side.
    """
    if val_fraction <= 0:
        return False
    return (zlib.crc32(text.encode("utf-8", errors="surrogatepass")) % 10_000) < val_fraction * 10_000
