"""Shared pytest hooks.

Notebook timings: tests/test_notebooks.py records how long each notebook took to execute
(through the `notebook_timings` fixture), and the terminal summary prints one line per notebook,
so the times show in the CI log even under `python -m pytest -q`.
"""

from __future__ import annotations

import pytest

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
