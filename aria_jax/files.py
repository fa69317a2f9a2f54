"""Writing model directories safely: all or nothing, and the files that travel with the weights."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

# Tokenizer, processor, chat template and generation settings: everything of a model directory
# except its weights, its index and its config (which the writer normalizes). Remote code
# (*.py) is left behind: it belongs to the original checkpoint format.
SIDE_FILE_SUFFIXES = (".json", ".jinja", ".model", ".txt")
NOT_SIDE_FILES = ("config.json", "model.safetensors.index.json", "aria_jax_checkpoint.json")


def copy_side_files(source: str, destination: str) -> list[str]:
    """Copies the tokenizer/processor/template files of `source` into `destination`."""
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name.endswith(SIDE_FILE_SUFFIXES) and name not in NOT_SIDE_FILES:
            shutil.copyfile(path, os.path.join(destination, name))
            copied.append(name)
    return copied


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def partial_path(destination: str) -> str:
    """Where `destination` is built before it is renamed into place: a hidden sibling."""
    parent, name = os.path.split(os.path.abspath(destination))
    return os.path.join(parent, f".{name}.partial")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def _exclusive(lock_path: str, destination: str):
    """Holds a lock on `destination` while one run writes it; a second run is refused."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{destination} is being written by another run (it holds {lock_path})") from None
        try:
            yield
        finally:
            os.remove(lock_path)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary sibling directory to fill; renames it to `destination` when the block
    completes. A failure, or the process being killed, never leaves a half-written destination;
    what a killed run leaves behind is cleaned up by the next one."""
    destination = os.path.abspath(os.fspath(destination))
    if not os.path.isdir(os.path.dirname(destination)):
        raise FileNotFoundError(f"{os.path.dirname(destination)}: no such directory to write {destination} into")
    partial = partial_path(destination)
    replaced = partial + ".replaced"
    with _exclusive(partial + ".lock", destination):
        if os.path.lexists(replaced):  # killed between the two renames below: the old one is whole
            if os.path.lexists(destination):
                _remove(replaced)
            else:
                os.rename(replaced, destination)
        if os.path.lexists(destination) and not overwrite:
            raise FileExistsError(f"{destination} already exists; pass --overwrite (overwrite=True) to replace it")
        _remove(partial)
        os.makedirs(partial)
        try:
            yield partial
        except BaseException:
            _remove(partial)
            raise
        if os.path.lexists(destination):
            os.rename(destination, replaced)
            os.rename(partial, destination)
            _remove(replaced)
        else:
            os.rename(partial, destination)
