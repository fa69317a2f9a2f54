"""Hostile input to loading, `aria-jax convert` and `aria-jax export`: destinations that would
destroy their source, corrupt or lying safetensors headers (also fuzzed), non-finite weights,
and runs killed (SIGKILL) at named points of their writes.

Nothing may be lost: every refusal happens before anything is touched, and every file outside
the destination is byte-for-byte what it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings

import aria_jax
from aria_jax.checkpoint import MANIFEST
from aria_jax.safetensors_io import CheckpointError, SafetensorsFile, parse_header
from cli_helpers import assert_one_line_error, partial_of, run_main
from repo_paths import TINY_RANDOM
from convert.conversion import NonFiniteWarning, convert_checkpoint, export_checkpoint
from crash_points import kill_at


def digest(directory) -> dict[str, str]:
    """Every entry below `directory` (links not followed) -> the sha256 of its bytes, or its kind."""
    entries = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, directory)
            if os.path.islink(path):
                entries[relative] = "link to " + os.readlink(path)
            elif os.path.isdir(path):
                entries[relative] = "directory"
            else:
                with open(path, "rb") as f:
                    entries[relative] = hashlib.sha256(f.read()).hexdigest()
    return entries


def flat_params(model) -> dict:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]
    }


def assert_same_params(actual, expected) -> None:
    actual, expected = flat_params(actual), flat_params(expected)
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


@pytest.fixture(scope="module")
def reference():
    return aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    destination = str(tmp_path_factory.mktemp("converted") / "tiny")
    convert_checkpoint(TINY_RANDOM, destination)
    return destination


@pytest.fixture
def models(tmp_path):
    """A folder of models as users keep them: the hub checkpoint, and a file of their own."""
    root = tmp_path / "models"
    shutil.copytree(TINY_RANDOM, root / "aria")
    (root / "notes.txt").write_text("mine")
    return root


# ----------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize(
    "where,problem",
    [
        ("same", "is the source"),  # convert SRC SRC --overwrite
        ("parent", "contains the source"),  # convert DIR/src DIR --overwrite
        ("inside", "lies inside the source"),
        ("link", "is the source"),  # a symbolic link to the source
    ],
)
def test_destination_overlapping_the_source_is_refused(models, converted, command, where, problem, capsys):
    source = models / "aria"
    if command == "export":
        shutil.rmtree(source)
        shutil.copytree(converted, source)
    destination = {"same": source, "parent": models, "inside": source / "out", "link": models / "link"}[where]
    if where == "link":
        os.symlink(source, destination)
    before = digest(models.parent)
    result = run_main(capsys, command, "--quiet", "--overwrite", str(source), str(destination))
    assert_one_line_error(result, str(destination), problem)
    assert digest(models.parent) == before


def test_overwrite_replaces_only_what_the_command_writes(models, converted, tmp_path, capsys):
    """--overwrite never replaces a folder of the user's, someone else's model or a file."""
    other_model = tmp_path / "other-model"
    shutil.copytree(TINY_RANDOM, other_model)
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    before = digest(tmp_path)
    for command, source, destination, problem in [
        ("convert", models / "aria", other_model, "is not a checkpoint written by `aria-jax convert`"),
        ("convert", models / "aria", a_file, "is not a directory"),
        ("export", converted, other_model, "is not a model directory written by aria-jax"),
        ("export", converted, models, "is not a model directory written by aria-jax"),
    ]:
        result = run_main(capsys, command, "--quiet", "--overwrite", str(source), str(destination))
        assert_one_line_error(result, str(destination), problem)
    assert digest(tmp_path) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(capsys, "export", "--quiet", "--overwrite", converted, str(empty)).returncode == 0
    assert run_main(capsys, "export", "--quiet", "--overwrite", converted, str(empty)).returncode == 0  # ours now
    assert_same_params(
        aria_jax.AriaForConditionalGeneration.from_pretrained(empty),
        aria_jax.AriaForConditionalGeneration.from_pretrained(converted),
    )


@pytest.mark.parametrize("size", ["0", "0.0001B", "-5MB", "lots"])
def test_shard_size_must_be_positive(converted, tmp_path, size, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "export", f"--max-shard-size={size}", converted, str(tmp_path / "out"))
    (line,) = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and f"not a size: {size!r}" in line
    with pytest.raises(ValueError, match="max_shard_bytes=0"):
        export_checkpoint(converted, tmp_path / "out", max_shard_bytes=0)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- safetensors headers


def header_and_data(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), f.read()


def write_raw(path, header, data: bytes) -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def tampered_copy(tmp_path, change) -> tuple[str, str]:
    """A copy of the tiny checkpoint whose header is `change(header)` (edited in place, or
    returned); returns (model directory, weights file)."""
    directory = tmp_path / "tampered"
    shutil.copytree(TINY_RANDOM, directory)
    path = str(directory / "model.safetensors")
    header, data = header_and_data(path)
    changed = change(header)
    write_raw(path, header if changed is None else changed, data)
    return str(directory), path


def first_tensor(header) -> str:
    return next(key for key in header if key != "__metadata__")


def relabel_as_int32(header):
    key = next(key for key, info in header.items() if key != "__metadata__" and info["dtype"] == "F32")
    header[key]["dtype"] = "I32"


def every_tensor_at_offset_zero(header):
    for key, info in header.items():
        if key != "__metadata__":
            begin, end = info["data_offsets"]
            info["data_offsets"] = [0, end - begin]


HEADER_CASES = {
    "entry_not_an_object": (lambda h: h.update({first_tensor(h): 5}), "not an object"),
    "entry_without_data_offsets": (lambda h: h[first_tensor(h)].pop("data_offsets") and h, "no 'data_offsets'"),
    "header_is_a_list": (lambda h: list(h), "a JSON list, not an object"),
    "int32_label_on_float_data": (relabel_as_int32, "has dtype I32"),
    "overlapping_offsets": (every_tensor_at_offset_zero, "overlaps the tensor before it"),
    "shape_not_integers": (lambda h: h[first_tensor(h)].update(shape=[2.5]), "not a list of non-negative integers"),
    "offsets_reversed": (lambda h: h[first_tensor(h)]["data_offsets"].reverse(), "0 <= begin <= end"),
    "metadata_not_strings": (lambda h: h.update({"__metadata__": {"format": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_corrupt_header_is_one_clear_error(tmp_path, case, capsys):
    change, expected = HEADER_CASES[case]
    directory, path = tampered_copy(tmp_path, change)
    with pytest.raises(CheckpointError, match=expected) as err:
        aria_jax.AriaForConditionalGeneration.from_pretrained(directory)
    assert path in str(err.value)
    result = run_main(capsys, "convert", "--quiet", directory, str(tmp_path / "out"))
    assert_one_line_error(result, path, expected)
    assert sorted(os.listdir(tmp_path)) == ["tampered"]


@pytest.mark.parametrize(
    "weight_map,expected",
    [
        (["model.safetensors"], "weight_map is a JSON list"),
        ({"lm": "../elsewhere/model.safetensors"}, "not a .safetensors file name"),  # a path out of the directory
        ({"lm": 7}, "not a .safetensors file name"),
    ],
)
def test_index_lists_only_files_of_its_directory(tmp_path, weight_map, expected):
    directory = tmp_path / "indexed"
    shutil.copytree(TINY_RANDOM, directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=expected):
        aria_jax.AriaForConditionalGeneration.from_pretrained(directory)


@pytest.mark.parametrize("piece_directory", ["../../elsewhere", "/absolute", "language_model/./x", ""])
def test_manifest_pieces_stay_inside_the_checkpoint(converted, tmp_path, piece_directory):
    directory = tmp_path / "converted"
    shutil.copytree(converted, directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["pieces"][0]["directory"] = piece_directory
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="is not a folder of params/"):
        aria_jax.AriaForConditionalGeneration.from_pretrained(directory)


def tiny_file(tmp_path, header, data: bytes) -> str:
    path = str(tmp_path / "t.safetensors")
    write_raw(path, header, data)
    return path


F32_PAIR = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]},
}


@pytest.mark.parametrize(
    "header,data,expected",
    [
        (F32_PAIR, bytes(20), None),
        (F32_PAIR, bytes(24), "the tensors hold 20 bytes of data, the file has 24"),  # bytes past the last tensor
        ({**F32_PAIR, "b": {**F32_PAIR["b"], "data_offsets": [12, 24]}}, bytes(24), "leaves a gap"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', bytes(4), "appears twice"),
        (b"\xff{}", b"", "not a JSON object"),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, b"", "not a JSON object"),  # nested past recursion
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "non-negative integers"),
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}}, bytes(4), "do not hold"),
    ],
)
def test_header_rules(tmp_path, header, data, expected):
    path = tiny_file(tmp_path, header, data)
    if expected is None:
        file = SafetensorsFile(path)
        assert file.keys() == ["a", "b"] and file.get("b").shape == (3,)
        return
    with pytest.raises(CheckpointError, match=expected) as err:
        SafetensorsFile(path)
    assert path in str(err.value)


def check_parsed(header: bytes, data_size: int) -> None:
    """parse_header either refuses with a CheckpointError or returns entries that keep every rule."""
    try:
        _, entries = parse_header("fuzzed", header, data_size)
    except CheckpointError:
        return
    covered = 0
    for dtype, shape, begin, end in sorted(entries.values(), key=lambda entry: entry[2:]):
        assert begin == covered and end - begin == int(np.prod(shape, dtype=object)) * dtype.itemsize
        covered = end
    assert covered == data_size


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**64) | st.floats() | st.sampled_from(["F32", "BF16", "I8", "x"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "a", "b"]), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(header=JSON_VALUES, data_size=st.integers(0, 64))
def test_fuzz_json_headers(header, data_size):
    check_parsed(json.dumps(header).encode(), data_size)


@settings(max_examples=300, deadline=None)
@given(
    path=st.sampled_from(
        [
            ("a",),
            ("b",),
            ("a", "dtype"),
            ("b", "shape"),
            ("a", "data_offsets"),
            ("b", "data_offsets"),
            ("a", "shape"),
            ("__metadata__",),
        ]
    ),
    value=JSON_VALUES,
    data_size=st.sampled_from([0, 8, 20, 24]),
)
def test_fuzz_mutated_headers(path, value, data_size):
    """One field of a valid header replaced by any JSON value."""
    header = json.loads(json.dumps(F32_PAIR))
    node = header
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    check_parsed(json.dumps(header).encode(), data_size)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.binary(max_size=200)
    | st.builds(
        lambda header, tail: struct.pack("<Q", len(header)) + header + tail,
        st.binary(max_size=120),
        st.binary(max_size=40),
    )
)
def test_fuzz_whole_files(content):
    """Arbitrary bytes (and arbitrary bytes behind a consistent length prefix) as a file: a
    CheckpointError, or a file whose every tensor reads."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "f.safetensors")
        with open(path, "wb") as f:
            f.write(content)
        try:
            file = SafetensorsFile(path)
        except CheckpointError:
            return
        for key in file.keys():
            assert file.get(key).shape == file.shape(key)


# ----------------------------------------------------------------------------- non-finite weights


@pytest.fixture
def nonfinite_model(tmp_path) -> tuple[str, dict[str, tuple[int, int]]]:
    directory = tmp_path / "nonfinite"
    shutil.copytree(TINY_RANDOM, directory)
    path = str(directory / "model.safetensors")
    file = SafetensorsFile(path)
    tensors = {key: np.array(file.get(key)) for key in file.keys()}
    del file
    nan_key, inf_key = sorted(key for key in tensors if key.endswith("q_proj.weight"))[:2]
    tensors[nan_key].flat[[0, 5, 7]] = np.nan
    tensors[inf_key].flat[[1]] = -np.inf
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return str(directory), {nan_key: (3, 0), inf_key: (0, 1)}


def test_nonfinite_weights_are_named(nonfinite_model, tmp_path, capsys):
    source, expected = nonfinite_model
    with pytest.warns(NonFiniteWarning, match="2 tensor"):
        summary = convert_checkpoint(source, tmp_path / "library")
    assert summary.nonfinite == expected

    result = run_main(capsys, "convert", "--quiet", source, str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith("aria-jax: warning: 2 tensor(s) hold non-finite values")
    for key, (nan, inf) in expected.items():
        assert f"{key} ({nan} NaN, {inf} inf)" in warning


def test_nonfinite_weights_refused_with_strict(nonfinite_model, tmp_path, capsys):
    source, expected = nonfinite_model
    destination = tmp_path / "strict"
    result = run_main(capsys, "convert", "--quiet", "--strict", source, str(destination))
    assert_one_line_error(result, "NaN", "refused with strict")
    assert any(key in result.stderr for key in expected)
    assert not destination.exists() and not os.path.exists(partial_of(destination))


# ----------------------------------------------------------------------------- killed runs


def outside(parent, destination) -> dict[str, str]:
    """What lies in `parent` apart from `destination` and its hidden work files."""
    hidden = os.path.basename(partial_of(destination))
    return {
        path: kind
        for path, kind in digest(parent).items()
        if not path.startswith((os.path.basename(destination), hidden))
    }


@pytest.mark.parametrize(
    "command,point,existing",
    [
        ("convert", "convert:piece-saved", False),
        ("convert", "atomic-directory:complete", True),
        ("convert", "atomic-directory:between-renames", True),
        ("export", "hub-weights:piece-written", False),
        ("export", "atomic-directory:between-renames", True),
    ],
)
def test_killed_run_loses_nothing_and_runs_again(models, converted, reference, command, point, existing, capsys):
    """SIGKILL at `point`: the destination is whole (the old one, or none); the next run with
    the same arguments succeeds and leaves no work files; nothing outside the destination changed."""
    source = str(models / "aria") if command == "convert" else converted
    destination = models / "out"
    if existing:
        assert run_main(capsys, command, "--quiet", source, str(destination)).returncode == 0
    before_outside, before = outside(models, destination), digest(destination) if existing else None

    kill_at([command, "--quiet", "--overwrite", source, str(destination)], point)

    assert outside(models, destination) == before_outside
    if point == "atomic-directory:between-renames":  # the old destination waits aside, whole
        assert not destination.exists() and digest(partial_of(destination) + ".replaced") == before
    else:
        assert digest(destination) == before if existing else not destination.exists()

    result = run_main(capsys, command, "--quiet", "--overwrite", source, str(destination))
    assert result.returncode == 0, result.stderr
    assert outside(models, destination) == before_outside
    assert sorted(os.listdir(models)) == ["aria", "notes.txt", "out"]
    assert (destination / MANIFEST).is_file() == (command == "convert")
    assert_same_params(aria_jax.AriaForConditionalGeneration.from_pretrained(destination), reference)
