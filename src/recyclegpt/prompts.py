"""Prompt sets for `bench`, `eval`, `serve` (warm-up and `--tree auto`) and `bench serve`: the shipped `code`
and `prose` sets, or the user's own file.

Shipped sets live in `recyclegpt/assets/prompts/NAME.jsonl` (one JSON object per line with a
`prompt` field). `code` is built by `benchmarks/build_prompts.py` from the Python standard-library
files in the shipped checkpoint's validation split (files it never trained on); `prose` is written
by hand.

A user file (`--prompts FILE`) is either
  - JSONL (`.jsonl` / `.ndjson`, or any file whose first non-blank line starts with `{` or `"`):
    one prompt per line, each a JSON string or an object with a `prompt` (or `text`) field; use
    this for prompts that span several lines (`"def f(x):\\n    "`);
  - plain text: one prompt per line, blank lines skipped, backslash escapes not interpreted.
Every problem (missing file, invalid JSON, a record without a prompt, an empty prompt, a file
with no prompts) raises a `RecycleError` naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import RecycleError

BUILTIN_SETS = ("code", "prose")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class PromptSet:
    name: str  # builtin set name, or the file path
    prompts: list[str]
    ids: list[str]  # a label per prompt (source:line for the code set, file:line for user files)

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> PromptSet:
        if n is None or n >= len(self.prompts):
            return self
        return PromptSet(self.name, self.prompts[:n], self.ids[:n])


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("recyclegpt") / "assets" / "prompts" / f"{name}.jsonl"))


def load_prompts(spec: str | Path = "code", limit: int | None = None) -> PromptSet:
    """A shipped set by name (`code`, `prose`, `all` = both) or a prompt file (see the module doc)."""
    spec = str(spec)
    if spec == "all":
        parts = [load_prompts(n) for n in BUILTIN_SETS]
        ps = PromptSet("all", [p for s in parts for p in s.prompts], [i for s in parts for i in s.ids])
        return ps.head(limit)
    if spec in BUILTIN_SETS and not Path(spec).exists():
        path = builtin_path(spec)
        if not path.is_file():
            raise RecycleError(f"the shipped prompt set {spec!r} is missing from this installation ({path})")
        ps = read_prompt_file(path)
        return PromptSet(spec, ps.prompts, ps.ids).head(limit)
    return read_prompt_file(spec).head(limit)


def _looks_like_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if not first.startswith(("{", '"')):
        return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False  # a plain-text prompt that happens to start with a quote
    return True


def read_prompt_file(path: str | Path) -> PromptSet:
    path = Path(path)
    if not path.exists():
        hint = f" (shipped sets: {', '.join(BUILTIN_SETS)}, all)" if "/" not in str(path) else ""
        raise RecycleError(f"prompt file not found: {path}{hint}")
    if not path.is_file():
        raise RecycleError(f"--prompts must be a file with one prompt per line (or JSONL), got a directory: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        from ..paths import read_error

        raise read_error(path, e, "prompt file") from None
    if b"\x00" in raw[:8192]:
        raise RecycleError(f"{path} looks binary; --prompts takes a text file with one prompt per line, or JSONL")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecycleError(f"{path} is not UTF-8 text (byte {e.start}); --prompts takes UTF-8 text or JSONL") from None
    lines = text.splitlines()
    prompts: list[str] = []
    ids: list[str] = []
    if _looks_like_jsonl(path, lines):
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecycleError(f"{path}:{i}: invalid JSON ({e.msg}); a JSONL prompt file needs one JSON "
                                   "string or object with a \"prompt\" field per line") from None
            if isinstance(rec, dict):
                key = "prompt" if "prompt" in rec else "text" if "text" in rec else None
                if key is None:
                    raise RecycleError(f"{path}:{i}: the record has no \"prompt\" (or \"text\") field")
                rec_id = rec.get("id")
                rec = rec[key]
            else:
                rec_id = None
            if not isinstance(rec, str):
                raise RecycleError(f"{path}:{i}: the prompt must be a string, got {type(rec).__name__}")
            if not rec.strip():
                raise RecycleError(f"{path}:{i}: the prompt is empty")
            prompts.append(rec)
            ids.append(str(rec_id) if rec_id is not None else f"{path.name}:{i}")
    else:
        for i, line in enumerate(lines, 1):
            if line.strip():
                prompts.append(line)
                ids.append(f"{path.name}:{i}")
    if not prompts:
        raise RecycleError(f"{path} holds no prompts; give one prompt per line (or JSONL with a \"prompt\" field)")
    return PromptSet(str(path), prompts, ids)
