"""Writing model directories safely: all or nothing, and the files that travel with the weights."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from typing import Callable

# Tokenizer, processor, chat template and generation settings: everything of a model directory
# except its weights, its index and its config (which the writer normalizes). Remote code
# (*.py) is left behind: it belongs to the original checkpoint format.
SIDE_FILE_SUFFIXES = (".json", ".jinja", ".model", ".txt")
NOT_SIDE_FILES = ("config.json", "model.safetensors.index.json", "aria_jax_checkpoint.json")


def is_side_file(directory: str, name: str) -> bool:
    path = os.path.join(directory, name)
    return os.path.isfile(path) and name.endswith(SIDE_FILE_SUFFIXES) and name not in NOT_SIDE_FILES


def holds_only(directory: str, names) -> bool:
    """Whether every entry of `directory` is one of `names` or a side file: nothing that a
    replacement of it would lose."""
    return all(name in names or is_side_file(directory, name) for name in os.listdir(directory))


def copy_side_files(source: str, destination: str) -> list[str]:
    """Copies the tokenizer/processor/template files of `source` into `destination`."""
    copied = [name for name in sorted(os.listdir(source)) if is_side_file(source, name)]
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    return copied


PAUSE_ENV = "ARIA_JAX_PAUSE_AT"


def pause_point(name: str) -> None:
    """A named point of a long write. With ARIA_JAX_PAUSE_AT=name in the environment the process
    says so on stderr and waits there, so that crash-safety tests can kill it at that point."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"aria-jax: paused at {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


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


def overlap(path: str, other: str) -> str | None:
    """How `path` overlaps `other`, symbolic links resolved: "is", "contains", "lies inside", or None."""
    path, other = os.path.realpath(path), os.path.realpath(os.fspath(other))
    common = os.path.commonpath([path, other])
    if common not in (path, other):
        return None
    return "is" if path == other else "contains" if common == path else "lies inside"


def check_apart(destination: str, sources) -> None:
    """Refuses a destination that is, contains or lies inside one of `sources`: writing it, or
    replacing it, would destroy what is being read."""
    for source in sources:
        relation = overlap(destination, source)
        if relation:
            raise FileExistsError(
                f"{destination} {relation} the source {os.path.realpath(source)}; choose another destination"
            )


def _check_replaceable(destination: str, replaceable: Callable[[str], bool] | None, what: str) -> None:
    if not os.path.isdir(destination) or os.path.islink(destination):
        raise FileExistsError(
            f"{destination} exists and is not a directory; --overwrite (overwrite=True) only replaces a directory"
        )
    if os.listdir(destination) and not (replaceable and replaceable(destination)):
        raise FileExistsError(
            f"{destination} exists and is not {what}; --overwrite (overwrite=True) replaces "
            "only that (or an empty directory): remove it yourself or choose another destination"
        )


@contextlib.contextmanager
def atomic_directory(
    destination: str | os.PathLike,
    overwrite: bool = False,
    *,
    sources=(),
    replaceable: Callable[[str], bool] | None = None,
    what: str = "a directory of this kind",
):
    """Yields a temporary sibling directory to fill; renames it to `destination` when the block
    completes. A failure, or the process being killed, never leaves a half-written destination;
    what a killed run leaves behind is cleaned up by the next one.

    A destination that is, contains or lies inside one of `sources` is refused before anything is
    touched. With `overwrite`, an existing destination is replaced only if it is empty or
    `replaceable(destination)` says it is `what` this writer writes, never an arbitrary folder."""
    destination = os.path.abspath(os.fspath(destination))
    check_apart(destination, sources)
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
        if os.path.lexists(destination):
            if not overwrite:
                raise FileExistsError(f"{destination} already exists; pass --overwrite (overwrite=True) to replace it")
            _check_replaceable(destination, replaceable, what)
        _remove(partial)
        os.makedirs(partial)
        try:
            yield partial
        except BaseException:
            _remove(partial)
            raise
        pause_point("atomic-directory:complete")
        if os.path.lexists(destination):
            os.rename(destination, replaced)
            pause_point("atomic-directory:between-renames")
            os.rename(partial, destination)
            _remove(replaced)
        else:
            os.rename(partial, destination)
