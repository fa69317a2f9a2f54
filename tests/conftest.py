"""Shared pytest set-up and hooks.

Notebook timings: tests/test_notebooks.py records how long each notebook took to execute
(through the `notebook_timings` fixture), and the terminal summary prints one line per notebook,
so the times show in the CI log even under `python -m pytest -q`.
"""

from __future__ import annotations

import os

import pytest

# The test extra installs libtpu (for `aria-jax plan --target`). With libtpu and no TPU, JAX's
# start-up tries a TPU client and prints its failure on stderr, which the tests of one-line CLI
# errors would see. The tests run on the CPU; set before anything imports JAX, and inherited by
# every subprocess a test starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

NOTEBOOK_TIMINGS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[NOTEBOOK_TIMINGS] = []


@pytest.fixture
def notebook_timings(request: pytest.FixtureRequest) -> list:
    """Append (notebook name, seconds) for each notebook that executed without error."""
    return request.config.stash[NOTEBOOK_TIMINGS]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for name, seconds in config.stash.get(NOTEBOOK_TIMINGS, []):
        terminalreporter.write_line(f"notebook {name}: executed without error in {seconds:.1f} s")
