"""The code stays as pyproject.toml's [tool.ruff] has it: formatted, and clean of lint errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repo_paths import ROOT


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_passes(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
