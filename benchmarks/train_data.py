"""A training-data directory without the held-out stdlib files: symlinks to every other stdlib file.

    python benchmarks/train_data.py runs/stdlib-train
    recyclegpt attach ... --data runs/stdlib-train --glob '*.py'
    python benchmarks/train_data.py runs/heldout --held-out     # the other side: only the held-out files

The held-out files are those `build_prompts.val_sources` finds (the shipped full model's validation
files: the `code` prompt set and the quality table of the README come from them), so a module trained
on this directory has seen none of the text it is measured on. (`--data stdlib` splits by document
text instead, a different 5%.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_prompts import val_sources  # noqa: E402

from recyclegpt.data.corpus import stdlib_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to create (must not exist)")
    ap.add_argument("--run", type=Path, default=ROOT / "runs/shipped",
                    help="the joint-training run whose split to use (default runs/shipped; recomputed without it)")
    ap.add_argument("--held-out", action="store_true", help="link the held-out files instead (for `recyclegpt eval`)")
    a = ap.parse_args()
    if a.out.exists():
        raise SystemExit(f"{a.out} exists; give a new directory")
    root = Path(sysconfig.get_paths()["stdlib"])
    held_out = {p.resolve() for p in val_sources(a.run, 0.05)}
    kept = [f for f in stdlib_files() if (f.resolve() in held_out) == a.held_out]
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    for f in kept:
        link = tmp / f.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, link)
    tmp.rename(a.out)
    print(f"{a.out}: {len(kept)} stdlib files" + ("" if a.held_out else f", {len(held_out)} held out"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
