"""Build the shipped `code` prompt set from the shipped checkpoint's held-out stdlib files.

    python benchmarks/build_prompts.py [--run runs/shipped] [--n 16] [--out src/recyclegpt/assets/prompts/code.jsonl]

The held-out files are the `val_sources` a training run records in RUN/tokens/manifest.json. Without
that file the same split is recomputed (the split is a deterministic hash of each file's path, see
`recyclegpt.data.corpus.is_validation`, at the default validation fraction 0.05).

Each prompt is a function (or method) from one of those files, cut right after its docstring, with
up to a dozen lines of the code before it as context: the model is asked to write the body. Files
are visited in sorted order and one function taken per file in turn (the middle of its
candidates), so the set is deterministic and spread over as many files as possible.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

from recyclegpt.data.corpus import is_validation, stdlib_files

ROOT = Path(__file__).resolve().parents[1]
MAX_CHARS = 900  # keeps prompt + 128 new tokens well inside the shipped model's 512-token window
CONTEXT_LINES = 12


def val_sources(run: Path, val_fraction: float) -> list[Path]:
    manifest = run / "tokens" / "manifest.json"
    if manifest.is_file():
        srcs = json.loads(manifest.read_text())["val_sources"]
        print(f"held-out files from {manifest}: {len(srcs)}")
        # Map to this interpreter's stdlib (the manifest holds the training machine's absolute paths).
        root = Path(sysconfig.get_paths()["stdlib"])
        out = []
        for s in srcs:
            p = Path(s)
            parts = p.parts
            idx = max(i for i, part in enumerate(parts) if part.startswith("python3"))
            local = root.joinpath(*parts[idx + 1:])
            out.append(local if local.is_file() else p)
        return [p for p in out if p.is_file()]
    files = [f for f in stdlib_files() if is_validation(str(f), val_fraction)]
    print(f"no {manifest}; recomputed the split at val_fraction={val_fraction}: {len(files)} files")
    return files


def candidates(path: Path) -> list[tuple[str, int, str]]:
    """(name, line, prompt) for each function with a docstring and a body of >= 3 lines after it."""
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines(keepends=True)
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno  # 1-based, inclusive
        if node.end_lineno - doc_end < 3:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        head = "".join(lines[start - 1:doc_end])
        if len(head) > MAX_CHARS - 100:
            continue
        ctx_start = max(0, start - 1 - CONTEXT_LINES)
        prompt = "".join(lines[ctx_start:doc_end])
        while len(prompt) > MAX_CHARS and ctx_start < start - 1:
            ctx_start += 1
            prompt = "".join(lines[ctx_start:doc_end])
        prompt = prompt.lstrip("\n")
        if not prompt.endswith("\n"):
            prompt += "\n"
        out.append((node.name, node.lineno, prompt))
    out.sort(key=lambda c: c[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/shipped", help="training run directory (default runs/shipped)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--n", type=int, default=16, help="prompts (default 16)")
    ap.add_argument("--out", default=str(ROOT / "src/recyclegpt/assets/prompts/code.jsonl"))
    a = ap.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    per_file = []
    for f in sorted(val_sources(Path(a.run), a.val_fraction)):
        c = candidates(f)
        if c:
            mid = len(c) // 2
            per_file.append((f, c[mid:] + c[:mid]))  # middle first, then the rest in order
    if not per_file:
        raise SystemExit("no held-out file has a function with a docstring")
    chosen = []
    rnd = 0
    while len(chosen) < a.n and any(rnd < len(c) for _, c in per_file):
        for f, c in per_file:
            if rnd < len(c) and len(chosen) < a.n:
                name, line, prompt = c[rnd]
                rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
                chosen.append({"id": f"{rel}:{line}", "function": name, "prompt": prompt})
        rnd += 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    print(f"wrote {len(chosen)} prompts from {len({r['id'].split(':')[0] for r in chosen})} files to {out}")


if __name__ == "__main__":
    main()
