"""Shared pytest set-up and hooks.

Notebook timings: tests/test_notebooks.py records how long each notebook took to execute
(through the `notebook_timings` fixture, as a property of the test's report, so that it reaches
the main process from pytest-xdist's workers), and the terminal summary prints one line per
notebook, so the times show in the CI log even under `python -m pytest -q`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The test extra installs libtpu (for `aria-jax plan --target`). With libtpu and no TPU, JAX's
# start-up tries a TPU client and prints its failure on stderr, which the tests of one-line CLI
# errors would see. The tests run on the CPU; set before anything imports JAX, and inherited by
# every subprocess a test starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests, and the commands, notebooks and README blocks they start, compile the same programs
# for the same small checkpoints: JAX's persistent compilation cache lets every process after the
# first load them. A directory of this run's own (every run starts empty), made by the first
# process that loads this file and inherited by pytest-xdist's workers and every subprocess.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aria_jax_tests_compiled_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    _made_compilation_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _made_compilation_cache = None

NOTEBOOK_SECONDS = "notebook seconds"  # the name of the report property
notebook_seconds: list[tuple[str, float]] = []  # in the process that prints the summary


@pytest.fixture
def notebook_timings(request: pytest.FixtureRequest):
    """Call with (notebook name, seconds) for each notebook that executed without error."""
    return lambda name, seconds: request.node.user_properties.append((NOTEBOOK_SECONDS, (name, seconds)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":  # the teardown's report carries the call's properties again
        return
    notebook_seconds.extend(value for key, value in report.user_properties if key == NOTEBOOK_SECONDS)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for name, seconds in notebook_seconds:
        terminalreporter.write_line(f"notebook {name}: executed without error in {seconds:.1f} s")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _made_compilation_cache:
        shutil.rmtree(_made_compilation_cache, ignore_errors=True)
