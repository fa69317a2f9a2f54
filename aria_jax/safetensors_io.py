"""Reading (memory-mapped or into fresh buffers) and streaming writing of safetensors files, bf16 included.

`safetensors.safe_open(framework="numpy")` cannot return bfloat16 and `framework="flax"` copies each
tensor onto the default device. The format is a little-endian u64 header length, a JSON header
and raw row-major data, so we map the file and view each tensor in place (bf16 through
ml_dtypes). Every offset is checked against the file size, so a truncated file fails here,
naming the file and the first tensor it cuts, instead of failing later with garbage.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """Tensors of one .safetensors file as read-only numpy views of a memory map."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes, file of {size})"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: key {key} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end > data_size:
                raise CheckpointError(
                    f"{path}: file is truncated: key {key} needs bytes {begin}..{end} of data, "
                    f"the file has {data_size}"
                )
            if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise CheckpointError(f"{path}: key {key}: {end - begin} bytes do not hold {shape} {info['dtype']}")
            self._entries[key] = (np.dtype(dtype), shape, begin, end)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def get(self, key: str) -> np.ndarray:
        """A read-only view into the mapped file; nothing is read until it is used."""
        dtype, shape, begin, end = self._entries[key]
        start = self._data_start + begin
        return self._map[start:start + (end - begin)].view(dtype).reshape(shape)

    def read(self, key: str) -> np.ndarray:
        """A fresh copy read with plain file reads. Unlike `get`, nothing stays resident after
        the copy is dropped (mapped pages count towards the process's memory until unmapped)."""
        dtype, shape, begin, end = self._entries[key]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
                raise CheckpointError(f"{self.path}: file is truncated: key {key} could not be read whole")
        return out


DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (every key, dtype and shape) is
    known up front, so no more than one tensor is ever held. Tensors must come in header order."""

    def __init__(self, path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]], metadata=None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order = []
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            self._order.append((key, np.dtype(dtype), tuple(shape)))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self.path = path
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, key: str, tensor: np.ndarray) -> None:
        expected_key, dtype, shape = self._order[self._next]
        if (key, tensor.dtype, tensor.shape) != (expected_key, dtype, shape):
            raise ValueError(f"{self.path}: expected {expected_key} {shape} {dtype} next, got {key} "
                             f"{tensor.shape} {tensor.dtype}")
        self._file.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8).data)
        self._next += 1
        if self._next == len(self._order):
            self._file.close()
