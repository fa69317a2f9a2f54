"""Running the `aria-jax` console script in tests, and what its user errors must look like."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from repo_paths import ROOT


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`aria-jax ARGS` in a fresh process (exit code, stdout and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def run_plan(*args: str) -> subprocess.CompletedProcess:
    """`aria-jax plan ARGS` in a fresh process without the tests' XLA_FLAGS: the plan simulates
    its own devices."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", "plan", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def two_layer_config(directory) -> str:
    """configs/aria.json at full width with 2 decoder and 2 vision layers, written to
    `directory`/config.json: full Aria's programs at a fraction of their compile time."""
    with open(os.path.join(ROOT, "configs", "aria.json")) as f:
        config = json.load(f)
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The console script's `main(argv)` in this process: the code `aria-jax ARGS` runs, without
    a second ~2 s import of jax and orbax. An exception escaping `main` (which would print a
    traceback) fails the test."""
    from aria_jax.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["aria-jax", *args], code, out, err)


def partial_of(destination) -> str:
    parent, name = os.path.split(os.path.abspath(os.fspath(destination)))
    return os.path.join(parent, f".{name}.partial")


def assert_one_line_error(result, *expected: str) -> str:
    """Exit status 2 and a single `aria-jax: error:` line on stderr holding every `expected` part."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aria-jax: error: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    return lines[0]
