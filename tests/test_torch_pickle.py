"""torch.save zip checkpoints read without torch and without running pickle code.

Files are written by torch itself (views, shared storages, parameters, module state dicts) and
read back bit for bit. Malicious pickles are put inside otherwise valid torch archives; each
payload would create a sentinel file, and each test first checks that plain `pickle.loads` of the
same bytes does run it, so a refusal that passes is a refusal of a working exploit.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from aria_jax.safetensors_io import CheckpointError
from aria_jax.torch_pickle import TorchZipCheckpoint
from repo_paths import ROOT

# ----------------------------------------------------------------------------- helpers


def saved(tmp_path, state, name: str = "pytorch_model.bin") -> str:
    path = str(tmp_path / name)
    torch.save(state, path)
    return path


def rewritten(path: str, replace: dict[str, bytes]) -> str:
    """The archive with some members (named below the top folder, e.g. "data.pkl") replaced."""
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in members:
            dst.writestr(name, replace.get(name.split("/", 1)[1], data))
    return path


def assert_same(array: np.ndarray, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous()
    assert array.shape == tuple(tensor.shape)
    assert array.flags.c_contiguous
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # compared bit for bit
        bits = {2: (torch.int16, np.int16), 1: (torch.uint8, np.uint8)}[tensor.element_size()]
        tensor, array = tensor.view(bits[0]), array.view(bits[1])
    np.testing.assert_array_equal(array, tensor.numpy(), strict=True)


def assert_reads_back(path: str, state: dict) -> TorchZipCheckpoint:
    checkpoint = TorchZipCheckpoint(path)
    assert checkpoint.keys() == list(state)
    for key, tensor in state.items():
        assert checkpoint.shape(key) == tuple(tensor.shape)
        assert checkpoint.file_path(key) == path
        assert_same(checkpoint.get(key), tensor)
    return checkpoint


def text(s: str) -> bytes:
    encoded = s.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE


def pickled_value(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # without PROTO and STOP


def state_dict_pickle(value_ops: bytes) -> bytes:
    """A protocol 2 pickle of {"w": <what value_ops leave on the stack>}."""
    return b"\x80\x02}" + text("w") + value_ops + b"s."


def call_global(module: str, name: str, *args) -> bytes:
    return f"c{module}\n{name}\n".encode() + pickled_value(args) + b"R"  # GLOBAL, args tuple, REDUCE


@pytest.fixture
def valid_file(tmp_path) -> str:
    return saved(tmp_path, {"w": torch.arange(4, dtype=torch.float32)})


# ----------------------------------------------------------------------------- round trips


NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,  # saved as an untyped storage and _rebuild_tensor_v3
}


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 100
    return values > 0 if dtype == torch.bool else values.to(dtype)


@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES), ids=str)
def test_round_trip_of_each_dtype_0d_and_3d(tmp_path, dtype):
    state = {"scalar": sample(dtype, ()), "cube": sample(dtype, (2, 3, 5)), "empty": sample(dtype, (0, 3))}
    checkpoint = assert_reads_back(saved(tmp_path, state), state)
    assert checkpoint.dtype("cube") == NUMPY_DTYPES[dtype]


def test_views_of_one_storage_read_as_torch_reads_them(tmp_path):
    base = torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4)
    state = {
        "base": base,
        "transposed": base.transpose(0, 2),
        "sliced": base[1, 1:],  # a storage offset
        "strided": base[:, ::2, 1::2],
        "row": base[1, 2],
    }
    path = saved(tmp_path, state)
    with zipfile.ZipFile(path) as archive:
        assert [n for n in archive.namelist() if "/data/" in n] == ["pytorch_model/data/0"]  # one shared storage
    assert_reads_back(path, state)


def test_parameter_and_module_state_dict(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = module.state_dict()  # an OrderedDict carrying _metadata (set by BUILD)
    assert_reads_back(saved(tmp_path, state, "module.pt"), state)
    parameter = {"p": torch.nn.Parameter(torch.randn(4, 2))}
    assert_reads_back(saved(tmp_path, parameter, "param.bin"), parameter)


def test_the_top_folder_is_whatever_the_file_was_saved_as(tmp_path):
    state = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    path = saved(tmp_path, state, "awaker_shard-00001.bin")
    renamed = str(tmp_path / "pytorch_model.bin")
    os.rename(path, renamed)
    with zipfile.ZipFile(renamed) as archive:
        assert archive.namelist()[0] == "awaker_shard-00001/data.pkl"
    assert_reads_back(renamed, state)


def test_members_without_torchs_alignment_padding(tmp_path):
    state = {"a": torch.randn(3, 4).t(), "b": torch.arange(5)}
    assert_reads_back(rewritten(saved(tmp_path, state), {}), state)  # zipfile writes no padding


def test_reads_where_torch_cannot_be_imported(tmp_path):
    state = {"w": torch.randn(2, 3, dtype=torch.float16), "b": torch.arange(3).to(torch.bfloat16)}
    path = saved(tmp_path, state)
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now fails\n"
        "import numpy as np\n"
        "from aria_jax.torch_pickle import TorchZipCheckpoint\n"
        "checkpoint = TorchZipCheckpoint(sys.argv[1])\n"
        "np.save(sys.argv[2], checkpoint.get('w'))\n"
        "np.save(sys.argv[3], checkpoint.get('b').view(np.int16))\n"
        "assert sys.modules['torch'] is None\n"
    )
    out_w, out_b = str(tmp_path / "w.npy"), str(tmp_path / "b.npy")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script, path, out_w, out_b], check=True, env=env, cwd=tmp_path)
    assert_same(np.load(out_w), state["w"])
    np.testing.assert_array_equal(np.load(out_b), state["b"].view(torch.int16).numpy())


# ----------------------------------------------------------------------------- refused pickles


def refuses(path: str, sentinel, *names: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        TorchZipCheckpoint(path)
    for name in (path,) + names:
        assert name in str(caught.value)
    assert not sentinel.exists()


def runs_when_unpickled(payload: bytes, sentinel) -> None:
    """The payload is a working exploit: plain pickle runs it (then the sentinel is removed)."""
    value = pickle.loads(payload)["w"]
    if isinstance(value, subprocess.Popen):
        value.wait()
    assert sentinel.exists()
    sentinel.unlink()


def touch_command(sentinel) -> str:
    return f"touch {sentinel}"


def python_touch(sentinel) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


CALLS = {
    "posix.system": lambda s: ("posix", "system", touch_command(s)),
    "os.system": lambda s: ("os", "system", touch_command(s)),
    "builtins.eval": lambda s: ("builtins", "eval", python_touch(s)),
    "builtins.exec": lambda s: ("builtins", "exec", python_touch(s)),
    "subprocess.Popen": lambda s: ("subprocess", "Popen", ["touch", str(s)]),
}


@pytest.mark.parametrize("refused", list(CALLS))
def test_a_global_that_would_run_code_is_refused(tmp_path, valid_file, refused):
    sentinel = tmp_path / "sentinel"
    payload = state_dict_pickle(call_global(*CALLS[refused](sentinel)))
    runs_when_unpickled(payload, sentinel)
    refuses(rewritten(valid_file, {"data.pkl": payload}), sentinel, f"the global {refused}")


def test_torch_load_as_a_global_is_refused_without_importing_it(tmp_path, valid_file, monkeypatch):
    sentinel = tmp_path / "sentinel"
    monkeypatch.setattr(torch, "load", lambda *args: sentinel.touch())  # what an unrestricted loader would call
    payload = state_dict_pickle(call_global("torch", "load", str(valid_file)))
    runs_when_unpickled(payload, sentinel)
    refuses(rewritten(valid_file, {"data.pkl": payload}), sentinel, "the global torch.load")


def test_a_tensor_rebuilt_by_a_refused_global_among_allowed_ones(tmp_path, valid_file):
    # A genuine tensor first, then the payload: nothing before the refusal may have run it.
    sentinel = tmp_path / "sentinel"
    with zipfile.ZipFile(valid_file) as archive:
        real = archive.read("pytorch_model/data.pkl")
    payload = real[:-1] + text("x") + call_global("posix", "system", touch_command(sentinel)) + b"s."
    refuses(rewritten(valid_file, {"data.pkl": payload}), sentinel, "the global posix.system")


def build_state(*state_ops: bytes) -> bytes:
    """An OrderedDict() given state by one BUILD per entry of state_ops."""
    return b"ccollections\nOrderedDict\n)R" + b"".join(op + b"b" for op in state_ops)


def test_setstate_planted_by_build_is_refused(tmp_path, valid_file):
    # BUILD {"__setstate__": os.system} then BUILD "touch ...": the second BUILD would call it.
    sentinel = tmp_path / "sentinel"
    plant = b"}" + text("__setstate__") + b"cposix\nsystem\ns"
    payload = state_dict_pickle(build_state(plant, text(touch_command(sentinel))))
    runs_when_unpickled(payload, sentinel)
    refuses(rewritten(valid_file, {"data.pkl": payload}), sentinel, "the global posix.system")


def test_build_state_other_than_metadata_is_refused(tmp_path, valid_file):
    # The same trick with an allowed callable: refused at BUILD, naming the class and the name.
    sentinel = tmp_path / "sentinel"
    plant = b"}" + text("__setstate__") + b"ctorch._utils\n_rebuild_parameter\ns"
    payload = state_dict_pickle(build_state(plant, pickled_value((1, 2, 3))))
    refuses(rewritten(valid_file, {"data.pkl": payload}), sentinel, "'__setstate__'", "collections.OrderedDict")


def test_build_on_a_tensor_and_objects_built_without_reduce_are_refused(tmp_path, valid_file):
    sentinel = tmp_path / "sentinel"
    with zipfile.ZipFile(valid_file) as archive:
        real = archive.read("pytorch_model/data.pkl")
    on_tensor = real[:-2] + b"}" + text("dtype") + text("x") + b"sbs."  # BUILD on the last tensor
    refuses(rewritten(valid_file, {"data.pkl": on_tensor}), sentinel, "BUILD setting state 'dtype'", "TensorRecord")
    newobj = state_dict_pickle(b"ccollections\nOrderedDict\n)\x81")
    refuses(rewritten(valid_file, {"data.pkl": newobj}), sentinel, "NEWOBJ")


def test_a_persistent_id_that_is_not_a_storage_is_refused(tmp_path, valid_file):
    payload = state_dict_pickle(pickled_value(("storage", "torch.FloatStorage", "0", "cpu", 4)) + b"Q")
    refuses(rewritten(valid_file, {"data.pkl": payload}), tmp_path / "sentinel", "persistent id")


# ----------------------------------------------------------------------------- refused files


def test_legacy_and_non_zip_files(tmp_path):
    legacy = str(tmp_path / "legacy.bin")
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch.save file"):
        TorchZipCheckpoint(legacy)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        TorchZipCheckpoint(str(other))
    plain_zip = str(tmp_path / "plain.zip")
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match=r"no <top>/data.pkl"):
        TorchZipCheckpoint(plain_zip)


def test_truncated_zip(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(64, 64)})
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt zip") as caught:
        TorchZipCheckpoint(path)
    assert path in str(caught.value)


@pytest.mark.parametrize(
    "state, problem",
    [
        ({"w": torch.ones(2), "step": 3}, "key step: holds builtins.int, not a tensor"),
        ({"model": {"w": torch.ones(2)}}, "key model: holds a nested dict"),
        ({"w": torch.ones(2), 7: torch.ones(1)}, r"key 7 is not a string \(a int\)"),
        ([torch.ones(2)], "holds a builtins.list, not a state dict"),
    ],
    ids=["int value", "nested dict", "int key", "list"],
)
def test_anything_but_a_flat_state_dict_of_tensors(tmp_path, state, problem):
    with pytest.raises(CheckpointError, match=problem):
        TorchZipCheckpoint(saved(tmp_path, state))


def test_a_tensor_larger_than_its_storage(tmp_path):
    path = saved(tmp_path, {"w": torch.ones(2, 3)})
    rewritten(path, {"data/0": b"\x00" * 16})
    with pytest.raises(CheckpointError, match=r"key w: the tensor \(2, 3\) needs bytes 0..24 .* holds 16 bytes"):
        TorchZipCheckpoint(path)


def test_big_endian_files_are_refused(tmp_path, valid_file):
    with pytest.raises(CheckpointError, match="byteorder is 'big'; only little-endian"):
        TorchZipCheckpoint(rewritten(valid_file, {"byteorder": b"big"}))
