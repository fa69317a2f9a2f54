"""Reading `torch.save` checkpoints (the zip format, torch >= 1.6) without torch and without
running any of the pickle's code.

Such a file is a zip archive whose members sit under one top folder (the stem of the name it was
saved under): `<top>/data.pkl` pickles the state dict, with every tensor storage replaced by a
persistent id ('storage', <storage class>, <key>, <location>, <numel>); the storage's raw bytes
are the member `<top>/data/<key>`, stored uncompressed; `<top>/byteorder` says "little" or "big".
A tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` in the
pickle, so views (transposes, slices, several keys on one storage) are described, not copied.

Safety rule: unpickling imports and calls whatever globals the pickle names. Here the only globals
that resolve are the handful torch.save writes for a state dict of tensors, and each resolves to
a local stand-in that records a tensor descriptor; any other global, any call of something else,
and any state set on an object (BUILD) other than an OrderedDict's `_metadata` is a
CheckpointError naming the file and what was refused, raised before anything is called. Opening
reads only the pickle; `get` seeks to one tensor's bytes in its storage member and reads those.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np

from aria_jax.safetensors_io import CheckpointError

# The typed storage classes torch.save names for a tensor's storage (`torch.<name>`).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Dtypes with no typed storage class (float8, uint16...) are saved as an untyped (byte) storage
# and `_rebuild_tensor_v3`, which names the dtype as the global `torch.<dtype>`.
TORCH_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number a pre-zip torch.save pickles first
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (versions, flags, sizes...), name and extra lengths


# ----------------------------------------------------------------------------- stand-ins


@dataclasses.dataclass(frozen=True)
class StorageType:
    """What a storage class global resolves to: its element dtype (uint8 for untyped storages)."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """What a `torch.<dtype>` global resolves to."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A persistent id: the storage member `data/<key>` holding elements of `dtype`."""

    key: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """A tensor as the pickle describes it; checked against the archive once its key is known."""

    storage: object
    offset: object
    size: object
    stride: object
    dtype: object  # None: the storage's dtype
    metadata: object


def _rebuild_tensor(storage, storage_offset, size, stride):
    return TensorRecord(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return TensorRecord(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return TensorRecord(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data  # an nn.Parameter is its tensor here


# The callables a pickle may reach, by the global it names; nothing else is ever called.
ALLOWED_CALLABLES = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
}
ALLOWED_GLOBALS = {
    **ALLOWED_CALLABLES,
    **{f"torch.{name}": StorageType(name, np.dtype(dtype)) for name, dtype in STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{f"torch.{name}": TorchDtype(name, np.dtype(dtype)) for name, dtype in TORCH_DTYPES.items()},
}
CALLABLE_NAMES = {id(value): name for name, value in ALLOWED_CALLABLES.items()}


class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcode table can be narrowed, the C one's cannot) resolving
    only ALLOWED_GLOBALS, calling only ALLOWED_CALLABLES and setting no object state except an
    OrderedDict's `_metadata` (torch's per-module version numbers)."""

    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self.path = path

    def refuse(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: refused {what} (a checkpoint's pickle may only rebuild state dict tensors)"
        )

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED_GLOBALS:
            raise self.refuse(f"the global {qualified}")
        return ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.refuse(f"the persistent id {pid!r:.100} (expected ('storage', type, key, location, numel))")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, StorageType) or not isinstance(key, str):
            raise self.refuse(f"the persistent id {pid!r:.100} (not a storage class and key)")
        return StorageRef(key, storage_type.dtype)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self.stack[-1] = self._call(func, args)

    def _call(self, func, args):
        name = CALLABLE_NAMES.get(id(func))
        if name is None or ALLOWED_CALLABLES[name] is not func:
            raise self.refuse(f"a call of {func!r:.100}")
        if not isinstance(args, tuple):
            raise self.refuse(f"a call of {name} with arguments {args!r:.100}")
        try:
            return func(*args)
        except TypeError:  # the stand-ins only bind arguments: this is a wrong argument count
            raise self.refuse(f"a call of {name} with {len(args)} arguments") from None

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not OrderedDict or not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            keys = sorted(map(repr, state)) if isinstance(state, dict) else [type(state).__name__]
            raise self.refuse(f"BUILD setting state {', '.join(keys)[:100]} on {_type_name(inst)}")
        inst.__dict__.update(state)

    def refuse_opcode(self):
        raise self.refuse("an object built by the NEWOBJ, OBJ, INST or EXT opcodes (torch.save writes none)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _opcode in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = refuse_opcode
    del _opcode


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


# ----------------------------------------------------------------------------- the checkpoint


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A checked tensor: bytes [begin, end) of storage member `member` hold it, laid out by
    `strides` (in bytes, relative to begin)."""

    member: str
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    begin: int
    end: int


class TorchZipCheckpoint:
    """The tensors of one torch.save zip file (a flat state dict), read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file_size = os.path.getsize(self.path)
        self._check_zip()
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._members = {info.filename: info for info in archive.infolist()}
                top = self._top_folder()
                self._top = top
                self._check_byteorder(archive)
                pickled = archive.read(f"{top}/data.pkl")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
            raise CheckpointError(f"{self.path}: truncated or corrupt zip ({err})") from None
        self._data_starts: dict[str, int] = {}
        self._entries: dict[str, TensorEntry] = {}
        for key, value in self._unpickle(pickled).items():
            self._entries[key] = self._check_tensor(key, value)

    # -- opening

    def _check_zip(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(64)
        if zipfile.is_zipfile(self.path):
            return
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{self.path}: truncated or corrupt zip (no central directory)")
        if head[:1] == b"\x80" and LEGACY_MAGIC.to_bytes(10, "little") in head:
            raise CheckpointError(
                f"{self.path}: a legacy torch.save file (torch < 1.6, not a zip); re-save it with a newer torch"
            )
        raise CheckpointError(f"{self.path}: not a torch zip checkpoint (not a zip file, {self._file_size} bytes)")

    def _top_folder(self) -> str:
        tops = [name[: -len("/data.pkl")] for name in self._members if name.endswith("/data.pkl")]
        tops = [top for top in tops if top and "/" not in top]
        if len(tops) != 1:
            found = "no <top>/data.pkl" if not tops else f"{len(tops)} data.pkl members"
            raise CheckpointError(f"{self.path}: not a torch zip checkpoint ({found})")
        return tops[0]

    def _check_byteorder(self, archive: zipfile.ZipFile) -> None:
        name = f"{self._top}/byteorder"
        if name not in self._members:
            return  # written since torch 1.10; older files are little-endian
        order = archive.read(name).strip()
        if order != b"little":
            raise CheckpointError(
                f"{self.path}: byteorder is {order.decode(errors='replace')!r}; only little-endian checkpoints are read"
            )

    def _unpickle(self, pickled: bytes) -> dict:
        try:
            state = RestrictedUnpickler(pickled, self.path).load()
        except CheckpointError:
            raise
        except Exception as err:  # a malformed pickle fails in many ways; none of them runs code
            raise CheckpointError(
                f"{self.path}: data.pkl is not a valid pickle ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: holds a {_type_name(state)}, not a state dict (str -> tensor)")
        return state

    def _check_tensor(self, key: object, record: object) -> TensorEntry:
        def bad(problem: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: key {key}: {problem}")

        if not isinstance(key, str):
            raise CheckpointError(f"{self.path}: key {key!r} is not a string (a {type(key).__name__})")
        if not isinstance(record, TensorRecord):
            what = "a nested dict (nested state dicts are not read)" if isinstance(record, dict) else _type_name(record)
            raise bad(f"holds {what}, not a tensor")
        storage = record.storage
        if not isinstance(storage, StorageRef):
            raise bad(f"the tensor's storage is a {_type_name(storage)}, not a storage")
        if record.dtype is None:
            dtype = storage.dtype
        elif isinstance(record.dtype, TorchDtype):
            dtype = record.dtype.dtype
        else:
            raise bad(f"the tensor's dtype is a {_type_name(record.dtype)}, not a torch dtype")
        if record.metadata:
            raise bad(f"the tensor has metadata {record.metadata!r:.100} (conj/neg bits), which is not read")
        size, stride, offset = record.size, record.stride, record.offset
        counts = (size, stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if counts is None or len(size) != len(stride) or not all(_is_count(n) for n in size + stride + (offset,)):
            raise bad(f"size {size!r:.100}, stride {stride!r:.100}, offset {offset!r} are not counts")

        member = f"{self._top}/data/{storage.key}"
        info = self._members.get(member)
        if info is None:
            raise bad(f"its storage {member} is not in the archive")
        itemsize = dtype.itemsize
        if 0 in size:
            begin = end = 0
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            begin, end = offset * itemsize, (last + 1) * itemsize
        if end > info.file_size:
            raise bad(
                f"the tensor {size} needs bytes {begin}..{end} of storage {member}, which holds {info.file_size} bytes"
            )
        if member not in self._data_starts:
            self._data_starts[member] = self._data_start(info, bad)
        return TensorEntry(member, dtype, size, tuple(s * itemsize for s in stride), begin, end)

    def _data_start(self, info: zipfile.ZipInfo, bad) -> int:
        """Where a storage member's bytes begin in the file: after its local header, whose extra
        field (torch pads it to align the data) may differ from the central directory's."""
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(f"storage {info.filename} is compressed (torch.save stores storages uncompressed)")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(ZIP_LOCAL_HEADER.size)
        if len(header) < ZIP_LOCAL_HEADER.size or ZIP_LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: truncated or corrupt zip (no local header for {info.filename})")
        _, name_len, extra_len = ZIP_LOCAL_HEADER.unpack(header)
        start = info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self._file_size:
            raise CheckpointError(f"{self.path}: truncated: storage {info.filename} ends past the end of the file")
        return start

    # -- reading

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key].dtype

    def file_path(self, key: str) -> str:
        return self.path

    def nbytes(self, key: str) -> int:
        """The tensor's size in bytes (what `get` returns, not the storage it views)."""
        entry = self._entries[key]
        return math.prod(entry.shape) * entry.dtype.itemsize

    def read(self, key: str) -> np.ndarray:
        """`get`: every read is a fresh copy here (the interface of `weights.HubCheckpoint`)."""
        return self.get(key)

    def get(self, key: str) -> np.ndarray:
        """A fresh contiguous array: only the bytes spanned by the tensor are read."""
        entry = self._entries[key]
        if entry.end == entry.begin:
            return np.zeros(entry.shape, entry.dtype)
        span = np.empty((entry.end - entry.begin) // entry.dtype.itemsize, entry.dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_starts[entry.member] + entry.begin)
            if f.readinto(memoryview(span.view(np.uint8))) != entry.end - entry.begin:
                raise CheckpointError(f"{self.path}: file is truncated: key {key} could not be read whole")
        tensor = np.lib.stride_tricks.as_strided(span, entry.shape, entry.strides, writeable=False)
        if span.size == math.prod(entry.shape) and tensor.flags.c_contiguous:
            return span.reshape(entry.shape)  # already the tensor: no copy
        return np.ascontiguousarray(tensor)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0
