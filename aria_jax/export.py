"""Params back to the hub format: safetensors that transformers' `from_pretrained` loads.

The key table of `weights.py` is read backwards: every param (each layer of a stacked one)
becomes the hub tensor it was loaded from, named as `save_pretrained` names it. Files are
written tensor by tensor, piece by piece (a converted checkpoint's pieces, or one per layer for
params in memory), so memory holds one piece at a time, and split into shards of at most `max_shard_bytes` with an index, as the hub
does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import numpy as np

from aria_jax.checkpoint import Piece, plan_pieces
from aria_jax.config import AriaConfig, AriaTextConfig
from aria_jax.families import key_table_for
from aria_jax.files import atomic_directory, copy_side_files, holds_only, pause_point, write_json
from aria_jax.safetensors_io import SafetensorsFile, SafetensorsWriter
from aria_jax.weights import INDEX_FILE, KeyTable, flatten_tree, hub_key

MAX_SHARD_BYTES = 5 * 10**9  # the hub's (and save_pretrained's) default shard size
# Stamped into every safetensors file we write, beside transformers' {"format": "pt"}: it is how
# `--overwrite` knows a directory to be one of our exports and not someone's model.
WRITER_METADATA = {"format": "pt", "writer": "aria-jax"}

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HubTensor:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def hub_config(config: AriaConfig | AriaTextConfig, dtype) -> dict:
    """config.json as transformers writes it, for a multimodal or a text-only model."""
    d = config.to_hf_dict()
    if isinstance(config, AriaTextConfig):
        d["architectures"] = ["AriaTextForCausalLM"]
    d["dtype"] = np.dtype(dtype).name
    return d


def unused_hub_tensors(config: AriaConfig | AriaTextConfig, dtype) -> dict[str, np.ndarray]:
    """Tensors transformers' model has and Aria never uses: the vision tower's post_layernorm,
    zeros, as the hub's own conversion writes them."""
    if not isinstance(config, AriaConfig):
        return {}
    zeros = np.zeros(config.vision_config.hidden_size, dtype)
    return {"vision_tower.post_layernorm.weight": zeros, "vision_tower.post_layernorm.bias": zeros}


def hub_tensors(
    pieces: list[Piece], dtype, text_only: bool, constants: dict[str, np.ndarray], table: KeyTable
) -> list[HubTensor]:
    tensors = []
    for piece in pieces:
        for path, shape in piece.leaves.items():
            rule = table.rule_for_path(path)
            tensors.append(
                HubTensor(hub_key(rule, piece.layer, text_only), rule.layout.hub_shape(shape), np.dtype(dtype))
            )
    tensors += [HubTensor(key, value.shape, value.dtype) for key, value in constants.items()]
    return tensors


def shard_names(tensors: list[HubTensor], max_shard_bytes: int) -> list[str]:
    """The file of each tensor, in order: a new shard whenever the next tensor would overflow."""
    shard_of, size, shard = [], 0, 0
    for tensor in tensors:
        if size and size + tensor.nbytes > max_shard_bytes:
            shard, size = shard + 1, 0
        shard_of.append(shard)
        size += tensor.nbytes
    count = shard + 1
    if count == 1:
        return ["model.safetensors"] * len(tensors)
    return [f"model-{s + 1:05d}-of-{count:05d}.safetensors" for s in shard_of]


def write_hub_weights(
    directory: str,
    config: AriaConfig | AriaTextConfig,
    pieces: list[Piece],
    read_piece: Callable[[Piece], dict[Path, np.ndarray]],
    dtype,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> list[HubTensor]:
    """Writes every tensor of `pieces` (arrays from `read_piece(piece)`, one piece in memory at a
    time) into `directory` as hub safetensors, with an index when there are several shards."""
    constants = unused_hub_tensors(config, dtype)
    table = key_table_for(config)
    tensors = hub_tensors(pieces, dtype, isinstance(config, AriaTextConfig), constants, table)
    names = shard_names(tensors, max_shard_bytes)
    writers: dict[str, SafetensorsWriter] = {}

    def write(position: int, array: np.ndarray) -> None:
        tensor, name = tensors[position], names[position]
        if name not in writers:
            entries = [(t.key, t.dtype, t.shape) for t, n in zip(tensors, names) if n == name]
            writers[name] = SafetensorsWriter(os.path.join(directory, name), entries, WRITER_METADATA)
        writers[name].write(tensor.key, array)
        if on_bytes:
            on_bytes(tensor.nbytes)

    position = 0
    for piece in pieces:
        arrays = read_piece(piece)
        for path in piece.leaves:
            write(position, table.rule_for_path(path).layout.to_hub(np.asarray(arrays[path], dtype)))
            position += 1
        del arrays
        pause_point("hub-weights:piece-written")
    for value in constants.values():
        write(position, value)
        position += 1
    if len(set(names)) > 1:
        write_json(
            os.path.join(directory, INDEX_FILE),
            {
                "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": {t.key: name for t, name in zip(tensors, names)},
            },
        )
    return tensors


def save_hub_weights(
    params: dict,
    config: AriaConfig | AriaTextConfig,
    directory: str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> list[HubTensor]:
    """Writes in-memory params ({component: subtree}, e.g. after fine-tuning) as hub
    safetensors in their own dtype. Each layer is fetched to the host on its own."""
    flat = flatten_tree(params)
    shapes = {path: tuple(value.shape) for path, value in flat.items()}
    dtype = np.dtype(next(iter(flat.values())).dtype)
    components = tuple(dict.fromkeys(path[0] for path in flat))
    # One piece per layer (and one for each component's unstacked params): no size limit.
    pieces = plan_pieces(shapes, components, dtype.itemsize, max_piece_bytes=math.inf)

    def read_piece(piece: Piece) -> dict[Path, np.ndarray]:
        layer = piece.layer
        return {path: np.asarray(flat[path] if layer is None else flat[path][layer]) for path in piece.leaves}

    return write_hub_weights(directory, config, pieces, read_piece, dtype, max_shard_bytes, on_bytes)


def is_exported(directory: str) -> bool:
    """Whether `directory` is a whole hub-format model directory that we wrote: config.json and
    safetensors files that all carry our stamp, nothing else but the index and side files."""
    weights = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
    if not (
        weights
        and os.path.isfile(os.path.join(directory, "config.json"))
        and holds_only(directory, {"config.json", INDEX_FILE, *weights})
    ):
        return False
    try:
        return all(
            SafetensorsFile(os.path.join(directory, name)).metadata.get("writer") == WRITER_METADATA["writer"]
            for name in weights
        )
    except (OSError, ValueError):
        return False


EXPORTED = "a model directory written by aria-jax (export or finetune)"


def save_model_directory(
    params: dict,
    config: AriaConfig | AriaTextConfig,
    directory: str | os.PathLike,
    side_files_from: str | None = None,
    overwrite: bool = False,
) -> None:
    """A complete hub-format model directory from in-memory params, all or nothing: config.json,
    safetensors, and the tokenizer / processor files of `side_files_from`. With `overwrite`, an
    existing `directory` is replaced only if it is one of ours (`is_exported`) or empty."""
    dtype = np.dtype(next(iter(flatten_tree(params).values())).dtype)
    sources = () if side_files_from is None else (side_files_from,)
    with atomic_directory(
        directory, overwrite=overwrite, sources=sources, replaceable=is_exported, what=EXPORTED
    ) as partial:
        save_hub_weights(params, config, partial)
        write_json(os.path.join(partial, "config.json"), hub_config(config, dtype))
        if side_files_from is not None:
            copy_side_files(side_files_from, partial)
