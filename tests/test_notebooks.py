"""The notebooks in notebooks/: each runs top to bottom without error on a CPU (demo and tiny
models, no hub access), and each is committed clean (no outputs, no execution counts), opening
with its Colab badge and the install cell.

Notebooks run in a Jupyter kernel of this interpreter, from the notebooks/ folder, in an
environment without XLA_FLAGS (the notebooks that simulate devices set it themselves). The
time each took is printed in the terminal summary (tests/conftest.py).
"""

from __future__ import annotations

import glob
import os
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from repo_paths import ROOT

NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
KERNEL_NAME = "aria-jax-tests"
CELL_TIMEOUT = 600  # seconds; the slowest cell (the LoRA fine-tune) takes well under a minute here
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
COLAB_URL = "https://colab.research.google.com/github/aria-jax/aria-jax/blob/main/notebooks/{}"


def notebook_id(path: str) -> str:
    return os.path.basename(path)


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec that starts this interpreter (sys.executable), whatever `python` is on PATH
    and whichever `python3` kernelspecs are installed."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


def test_kernel_runs_this_interpreter(kernel_spec_manager):
    assert kernel_spec_manager.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_executes(path, kernel_spec_manager, notebook_timings):
    notebook = nbformat.read(path, as_version=4)
    kernel = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT, startup_timeout=120, resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError naming the cell and the traceback
    seconds = time.perf_counter() - start
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    notebook_timings(notebook_id(path), seconds)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_is_committed_clean(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has outputs"
            assert cell.execution_count is None, f"cell {index} has an execution count"

    first, second = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert BADGE + f"({COLAB_URL.format(notebook_id(path))})" in first.source
    assert second.cell_type == "code"
    for text in (
        'if "google.colab" in sys.modules:',
        "git",
        "clone",
        "pip",
        "install",
        'os.chdir("/content/aria-jax/notebooks")',
    ):
        assert text in second.source, f"the install cell lacks {text!r}"


def test_there_are_notebooks():
    assert [notebook_id(path) for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_convert_full_aria.ipynb",
        "03_tpu_pod_inference.ipynb",
        "04_finetune_lora.ipynb",
        "05_video.ipynb",
        "06_awaker.ipynb",
    ]
