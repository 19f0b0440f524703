"""The repository stands on its own: docs/definitions.md lists the bench report's keys, and no file
points readers to design notes that ship outside the repository."""

from __future__ import annotations

from pathlib import Path

from recyclegpt.bench.report import MODES, RESULT_KEYS, TOP_KEYS

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = ROOT / "docs" / "definitions.md"


def test_definitions_list_every_bench_json_key():
    text = DEFINITIONS.read_text()
    missing = [k for k in (*TOP_KEYS, *RESULT_KEYS, *MODES) if f"`{k}`" not in text]
    assert not missing, f"docs/definitions.md does not document {missing}"


def test_no_reference_to_files_outside_the_repository():
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for top, pattern in (("src", "*.py"), ("tests", "*.py"), ("benchmarks", "*.py"), ("benchmarks", "*.md"),
                         ("docs", "*.md")):
        files += [p for p in (ROOT / top).rglob(pattern) if ".egg-info" not in str(p)]
    this = Path(__file__).resolve()
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.resolve() != this
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "DESIGN.md" in line or "../shared" in line]
    assert not offenders, f"references to files outside the repository (use docs/definitions.md): {offenders}"


def test_the_all_extra_holds_every_user_extra():
    """`pip install "recyclegpt[all]"` installs every optional feature (dev's test tools aside)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    users = sorted(set(extras) - {"all", "dev"})
    assert extras["all"] == [f"recyclegpt[{','.join(users)}]"], extras["all"]
