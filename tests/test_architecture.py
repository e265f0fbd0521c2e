"""The import contracts (pyproject.toml, import-linter) hold, and an upward import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys, importlinter.cli as cli; sys.exit(cli.lint_imports_command())"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts over the `elasticserve` package in `tree`."""
    config = str(ROOT / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # ahead of the editable install
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", config],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("model/shapes.py", "from ..engine import scheduler", "elasticserve.model is not allowed"),
        ("kernels/reference.py", "from ..server import protocol", "elasticserve.kernels is not"),
        ("engine/sequence.py", "from ..cli import main", "elasticserve.engine is not allowed"),
        ("policy/grid.py", "import torch", "pure Python BROKEN"),
    ],
)
def test_an_upward_import_breaks_them(tmp_path: Path, module: str, line: str, broken: str):
    copy = tmp_path / "elasticserve"
    shutil.copytree(
        ROOT / "elasticserve", copy, ignore=shutil.ignore_patterns("__pycache__", "packs")
    )
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = lint(tmp_path)
    assert result.returncode == 1 and broken in result.stdout, result.stdout + result.stderr
