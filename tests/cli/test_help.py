"""`elasticserve --help` builds every subcommand's parser without importing torch or the server."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "numpy", "fastapi", "uvicorn", "httpx", "ray", "triton")
CODE = f"""
import sys
from elasticserve.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
"""


@pytest.mark.parametrize("command", [[], ["serve"], ["calibrate"], ["profile"], ["bench", "serve"]])
def test_help_imports_no_torch_transformers_or_server(command: list[str]):
    result = subprocess.run(
        [sys.executable, "-c", CODE, *command, "--help"], capture_output=True, text=True, check=True
    )
    *help_text, loaded = result.stdout.strip().splitlines()
    assert loaded == "[]", f"building the parser imported {loaded}"
    assert help_text[0].startswith("usage: elasticserve")


def test_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "elasticserve.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for name in ("generate", "shapes", "serve", "calibrate", "eval", "finetune", "distill-data"):
        assert name in result.stdout
    assert "export" in result.stdout and "profile" in result.stdout and "bench" in result.stdout
