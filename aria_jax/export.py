"""Params back to the hub format: safetensors that transformers' `from_pretrained` loads.

The key table of `weights.py` is read backwards: every param (each layer of a stacked one)
becomes the hub tensor it was loaded from, named as `save_pretrained` names it. Files are
written tensor by tensor in groups (a layer, or a converted checkpoint's piece), so memory holds
one group at a time, and split into shards of at most `max_shard_bytes` with an index, as the hub
does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from aria_jax.config import AriaConfig, AriaTextConfig
from aria_jax.files import write_json
from aria_jax.safetensors_io import SafetensorsWriter
from aria_jax.weights import INDEX_FILE, RULE_FOR_PATH, flatten_tree, hub_key, is_stacked

MAX_SHARD_BYTES = 5 * 10**9  # the hub's (and save_pretrained's) default shard size

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HubTensor:
    key: str
    path: Path
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Group:
    """Params read together: `shapes` maps each path to its (per-layer) shape."""

    layer: int | None
    shapes: dict[Path, tuple[int, ...]]


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
    if isinstance(config, AriaTextConfig):
        return {}
    zeros = np.zeros(config.vision_config.hidden_size, dtype)
    return {"vision_tower.post_layernorm.weight": zeros, "vision_tower.post_layernorm.bias": zeros}


def hub_tensors(groups: list[Group], dtype, text_only: bool, constants: dict[str, np.ndarray]) -> list[HubTensor]:
    tensors = []
    for group in groups:
        for path, shape in group.shapes.items():
            rule = RULE_FOR_PATH[path]
            key = hub_key(rule, group.layer, text_only)
            tensors.append(HubTensor(key, path, group.layer, rule.layout.hub_shape(shape), np.dtype(dtype)))
    tensors += [HubTensor(key, (), None, value.shape, value.dtype) for key, value in constants.items()]
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


def write_hub_weights(directory: str, config: AriaConfig | AriaTextConfig, groups: list[Group],
                      read_group: Callable[[int], dict[Path, np.ndarray]], dtype,
                      max_shard_bytes: int = MAX_SHARD_BYTES,
                      on_bytes: Callable[[int], None] | None = None) -> list[HubTensor]:
    """Writes every tensor of `groups` (arrays from `read_group(index)`, one group in memory at a
    time) into `directory` as hub safetensors, with an index when there are several shards."""
    constants = unused_hub_tensors(config, dtype)
    tensors = hub_tensors(groups, dtype, isinstance(config, AriaTextConfig), constants)
    names = shard_names(tensors, max_shard_bytes)
    writers: dict[str, SafetensorsWriter] = {}

    def write(position: int, array: np.ndarray) -> None:
        tensor, name = tensors[position], names[position]
        if name not in writers:
            entries = [(t.key, t.dtype, t.shape) for t, n in zip(tensors, names) if n == name]
            writers[name] = SafetensorsWriter(os.path.join(directory, name), entries)
        writers[name].write(tensor.key, array)
        if on_bytes:
            on_bytes(tensor.nbytes)

    position = 0
    for index, group in enumerate(groups):
        arrays = read_group(index)
        for path in group.shapes:
            write(position, RULE_FOR_PATH[path].layout.to_hub(np.asarray(arrays[path], dtype)))
            position += 1
        del arrays
    for value in constants.values():
        write(position, value)
        position += 1
    if len(set(names)) > 1:
        write_json(os.path.join(directory, INDEX_FILE), {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.key: name for t, name in zip(tensors, names)},
        })
    return tensors


def layer_groups(flat_shapes: dict[Path, tuple[int, ...]]) -> list[Group]:
    """Groups for params in memory: each component's unstacked params, then one group per layer."""
    groups = []
    for component in dict.fromkeys(path[0] for path in flat_shapes):
        paths = [path for path in flat_shapes if path[0] == component]
        stacked = [path for path in paths if is_stacked(path)]
        groups.append(Group(None, {path: flat_shapes[path] for path in paths if path not in stacked}))
        if stacked:
            for layer in range(flat_shapes[stacked[0]][0]):
                groups.append(Group(layer, {path: flat_shapes[path][1:] for path in stacked}))
    return groups


def save_hub_weights(params: dict, config: AriaConfig | AriaTextConfig, directory: str,
                     max_shard_bytes: int = MAX_SHARD_BYTES, on_bytes: Callable[[int], None] | None = None,
                     ) -> list[HubTensor]:
    """Writes in-memory params ({component: subtree}, e.g. after fine-tuning) as hub
    safetensors in their own dtype. Each layer is fetched to the host on its own."""
    flat = flatten_tree(params)
    shapes = {path: tuple(value.shape) for path, value in flat.items()}
    dtype = np.dtype(next(iter(flat.values())).dtype)

    groups = layer_groups(shapes)

    def read_group(index: int) -> dict[Path, np.ndarray]:
        layer = groups[index].layer
        return {path: np.asarray(flat[path] if layer is None else flat[path][layer]) for path in groups[index].shapes}

    return write_hub_weights(directory, config, groups, read_group, dtype, max_shard_bytes, on_bytes)
