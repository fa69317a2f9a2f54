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
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


Entry = tuple[np.dtype, tuple[int, ...], int, int]  # dtype, shape, begin, end (bytes into the data)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool and float are not counts


def parse_header(path: str, header: bytes, data_size: int) -> tuple[dict[str, str], dict[str, Entry]]:
    """The tensors of a safetensors header, validated as the format requires: a JSON object
    (UTF-8, no repeated key) of tensor entries, each an object with a known `dtype`, a `shape`
    of non-negative integers and `data_offsets` [begin, end] holding exactly that many bytes; the
    entries, ordered by offset, tile the data from its first byte to its last without gap or
    overlap. An optional `__metadata__` maps strings to strings. Anything else is a
    CheckpointError naming the file and, where there is one, the key. Returns (metadata, entries)."""
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object: {_one_line(err)})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(parsed).__name__}, not an object)")
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")

    entries: dict[str, Entry] = {}
    for key, info in parsed.items():

        def bad(problem: str) -> CheckpointError:
            return CheckpointError(f"{path}: key {key}: {problem}")

        if not isinstance(info, dict):
            raise bad(f"the header entry is a JSON {type(info).__name__}, not an object")
        missing = [field for field in ("dtype", "shape", "data_offsets") if field not in info]
        if missing:
            raise bad(f"the header entry has no {missing[0]!r}")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"unsupported dtype {info['dtype']!r} (supported: {', '.join(DTYPES)})")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(n) for n in offsets)
            or offsets[0] > offsets[1]
        ):
            raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise bad(f"the file is truncated: the tensor needs bytes {begin}..{end} of data, the file has {data_size}")
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise bad(f"{end - begin} bytes do not hold {tuple(shape)} {info['dtype']}")
        entries[key] = (np.dtype(dtype), tuple(shape), begin, end)

    covered = 0  # the entries in order of their offsets must tile the data exactly
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: key {key}: data_offsets [{begin}, {end}] {problem} (bytes up to {covered} are taken)"
            )
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: the tensors hold {covered} bytes of data, the file has {data_size}")
    return metadata, entries


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


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
            header = f.read(header_len)
        self._data_start = 8 + header_len
        self.metadata, self._entries = parse_header(path, header, size - self._data_start)
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
        return self._map[start : start + (end - begin)].view(dtype).reshape(shape)

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
FLOAT_DTYPES = tuple(np.dtype(DTYPES[name]) for name in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (every key, dtype and shape) is
    known up front, so no more than one tensor is ever held. Tensors must come in header order."""

    def __init__(self, path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]], metadata=None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order = []
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[key] = {
                "dtype": DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
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
            raise ValueError(
                f"{self.path}: expected {expected_key} {shape} {dtype} next, got {key} {tensor.shape} {tensor.dtype}"
            )
        self._file.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8).data)
        self._next += 1
        if self._next == len(self._order):
            self._file.close()
