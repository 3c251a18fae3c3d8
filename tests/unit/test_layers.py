"""The dependency direction (pyproject.toml [tool.importlinter]) holds, and its check can fail: a copy of
the tree with one import against the direction is refused, naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_tree_keeps_the_direction() -> None:
    out = lint(ROOT)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout + out.stderr


def test_an_import_against_the_direction_fails(tmp_path: Path) -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["importlinter"]["root_packages"]
    for package in packages:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "domain" / "tasks.py", "a") as f:
        f.write("\nimport web.app  # the domain reaching up into the web\n")
    out = lint(tmp_path)
    assert out.returncode != 0 and "domain is not allowed to import web" in out.stdout, out.stdout
    assert "domain.tasks -> web.app" in out.stdout
