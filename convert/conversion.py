"""`aria-jax convert` (hub safetensors -> converted orbax checkpoint) and `aria-jax export` (back).

Both check everything that can be checked before writing a byte (keys, shapes, config), build
the destination in a hidden sibling directory that is renamed into place at the end, hold one
piece or layer in memory at a time, and report progress over bytes.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
import warnings

import numpy as np
from tqdm import tqdm

from aria_jax.checkpoint import CONVERTED, Manifest, is_whole_conversion, plan_pieces, write_pieces
from aria_jax.export import EXPORTED, MAX_SHARD_BYTES, hub_config, is_exported, write_hub_weights
from aria_jax.safetensors_io import CheckpointError
from aria_jax.files import atomic_directory, copy_side_files, write_json
from aria_jax.families import config_from_directory, key_table_for, param_layout
from aria_jax.pretrained import resolve_dtype, shape_tree
from aria_jax.quantization import DEFAULT_GROUP_SIZE, Quantization
from aria_jax.weights import HubCheckpoint, KeyTable, flatten_tree, layer_sources, plan_load


class NonFiniteWarning(UserWarning):
    """Weights that hold NaN or infinite values (converted as they are)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    verb: str
    tensors: int
    bytes: int
    seconds: float
    destination: str
    nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # key: (NaN, inf) counts

    @property
    def peak_memory_bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def line(self) -> str:
        return (
            f"{self.verb} {self.tensors} tensors, {human_bytes(self.bytes)} in {self.seconds:.1f} s, "
            f"peak memory {human_bytes(self.peak_memory_bytes)}: {self.destination}"
        )


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    config: object  # AriaConfig, AriaTextConfig or Qwen2VLConfig (`families`)
    components: tuple[str, ...]
    flat_shapes: dict[tuple[str, ...], tuple[int, ...]]
    table: KeyTable

    @classmethod
    def of(cls, directory: str) -> "ModelLayout":
        config = config_from_directory(directory)
        components, boxed_shapes = param_layout(config)
        return cls(config, components, flatten_tree(shape_tree(boxed_shapes)), key_table_for(config))


def _progress(total: int, description: str, quiet: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=quiet, dynamic_ncols=True
    )


def count_nonfinite(tensor: np.ndarray) -> tuple[int, int]:
    """(NaN values, infinite values) of a float tensor."""
    return int(np.count_nonzero(np.isnan(tensor))), int(np.count_nonzero(np.isinf(tensor)))


def nonfinite_message(counts: dict[str, tuple[int, int]]) -> str:
    listed = ", ".join(f"{key} ({nan} NaN, {inf} inf)" for key, (nan, inf) in list(counts.items())[:5])
    more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
    return f"{len(counts)} tensor(s) hold non-finite values: {listed}{more}"


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    strict: bool = False,
    quantize=None,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_vision: bool = False,
) -> Summary:
    """Converts a hub-format directory (hub or original rhymes-ai naming, one or several
    safetensors files) into a self-contained converted checkpoint at `destination`, with params
    in `dtype` (default: the source's widest float type).

    NaN and infinite values are counted per tensor as it streams by: they are converted as they
    are, with a NonFiniteWarning naming the tensors (`Summary.nonfinite` has the counts), or with
    `strict` the first such tensor is a CheckpointError and nothing is written. A destination
    that is, contains or lies inside the source is refused, and `overwrite` replaces only a
    converted checkpoint. `quantize` ("int8" or "int4", see `aria_jax.quantization`) stores the
    weights it covers quantized, their scales beside them."""
    start = time.perf_counter()
    quantization = Quantization.of(quantize, group_size, quantize_vision)
    source = os.fspath(source)
    checkpoint = HubCheckpoint(source)  # refuses pickles and unreadable files before anything else
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    model = ModelLayout.of(directory)
    plan = plan_load(checkpoint, model.flat_shapes, model.components, model.table)
    for path, shape in model.flat_shapes.items() if quantization else ():  # a bad group size fails before writing
        if (input_axes := quantization.input_axes(path)) is not None:
            quantization.scales_shape(path, shape, input_axes)
    keys = [s.key for sources in plan.values() for s in sources]
    source_dtypes = [checkpoint.dtype(key) for key in keys]
    target = np.dtype(resolve_dtype(dtype) if dtype else max(source_dtypes, key=lambda t: t.itemsize))
    # A narrowing cast happens on reading; a widening one is left to orbax, so that what is held
    # is never larger than the source tensor.
    held_itemsize = min(target.itemsize, max(t.itemsize for t in source_dtypes))
    largest = max(checkpoint.nbytes(key) for key in keys)
    pieces = plan_pieces(model.flat_shapes, model.components, held_itemsize, largest)
    total = sum(checkpoint.nbytes(key) for key in keys)

    nonfinite: dict[str, tuple[int, int]] = {}
    with (
        _progress(total, "convert", quiet) as bar,
        atomic_directory(
            destination, overwrite, sources=(directory,), replaceable=is_whole_conversion, what=CONVERTED
        ) as partial,
    ):

        def read_tensor(found, shape):
            tensor = checkpoint.read(found.key)
            counts = count_nonfinite(tensor)
            if any(counts):
                if strict:
                    raise CheckpointError(
                        f"{checkpoint.file_path(found.key)}: key {found.key} holds {counts[0]} "
                        f"NaN and {counts[1]} infinite values (refused with strict)"
                    )
                nonfinite[found.key] = counts
            bar.update(tensor.nbytes)
            return found.rule.layout.to_param(tensor, shape)

        def read_leaf(path, layer):
            found = layer_sources(plan[path], layer)
            rule = found[0].rule
            part_shape = rule.part_shape(model.flat_shapes[path])
            param = read_tensor(found[0], part_shape)
            if rule.parts:
                param = np.stack([param] + [read_tensor(source, part_shape) for source in found[1:]])
            input_axes = quantization.input_axes(path, one_layer=layer is not None) if quantization else None
            if input_axes is not None:
                return dict(zip(("values", "scales"), quantization.quantize(param, path, input_axes)))
            narrower = target.itemsize < param.dtype.itemsize
            return param.astype(target) if narrower else np.ascontiguousarray(param)

        write_json(os.path.join(partial, "config.json"), hub_config(model.config, target))
        copy_side_files(directory, partial)
        write_pieces(partial, pieces, read_leaf, target, quantization)
    if nonfinite:
        warnings.warn(nonfinite_message(nonfinite), NonFiniteWarning, stacklevel=2)
    return Summary("converted", len(keys), total, time.perf_counter() - start, os.path.abspath(destination), nonfinite)


def export_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    overwrite: bool = False,
    quiet: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Summary:
    """Writes a converted checkpoint back in hub format (safetensors shards of at most
    `max_shard_bytes` with an index, hub naming, config.json, tokenizer/processor files), so
    that transformers' `from_pretrained(destination)` loads it. A destination that is, contains
    or lies inside the source is refused, and `overwrite` replaces only an earlier export."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: must be a positive number of bytes")
    start = time.perf_counter()
    source = os.fspath(source)
    manifest = Manifest.read(source)
    if manifest.quantization is not None:
        raise CheckpointError(
            f"{source}: weights stored quantized ({manifest.quantization.scheme}); the hub format "
            "holds float weights, so export the float conversion (convert without --quantize)"
        )
    model = ModelLayout.of(source)
    manifest.check_covers(model.flat_shapes, model.components)
    pieces = [piece for piece in manifest.pieces if piece.component in model.components]
    total = sum(int(np.prod(shape)) * manifest.dtype.itemsize for piece in pieces for shape in piece.leaves.values())

    with (
        _progress(total, "export", quiet) as bar,
        atomic_directory(destination, overwrite, sources=(source,), replaceable=is_exported, what=EXPORTED) as partial,
    ):
        write_json(os.path.join(partial, "config.json"), hub_config(model.config, manifest.dtype))
        copy_side_files(source, partial)
        tensors = write_hub_weights(
            partial, model.config, pieces, manifest.restore_piece_numpy, manifest.dtype, max_shard_bytes, bar.update
        )
    return Summary("exported", len(tensors), total, time.perf_counter() - start, os.path.abspath(destination))
