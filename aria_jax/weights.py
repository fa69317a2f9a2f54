"""Hub checkpoints (safetensors, single or sharded) into our params tree.

One table says where every hub tensor goes. Loading checks the whole checkpoint against it
before reading any data: an unknown, missing, duplicated or mis-shaped key is an error that
names the file and the key. Tensors are read from memory maps one at a time, straight into
the arrays they belong to; no file is ever read whole into a dict, and only safetensors are
read (a pickle checkpoint is refused without being opened).

Key generations (aria-reference.md section 2), for the text model:
- text-only checkpoints (`AriaTextForCausalLM`):          `model.layers.{i}...`, `lm_head.weight`
- multimodal hub / original rhymes-ai checkpoints:          `language_model.model.layers.{i}...`,
                                                            `language_model.lm_head.weight`
- transformers 5 in-memory names (`state_dict()` saved raw): `model.language_model.layers.{i}...`,
                                                            `lm_head.weight`, `experts.gate_up_proj`
Original files may also hold `rotary_emb.inv_freq` buffers, which are recomputed and skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Callable, Iterable

import jax
import numpy as np

from aria_jax.safetensors_io import CheckpointError, SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- the key table

@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Hub tensor `template` (with `{i}` for the layer) -> param at `path`.

    `linear_in_dims` is None for tensors stored in our layout, else the hub tensor is a torch
    Linear weight (out, in) and our kernel is its transpose reshaped to (in dims..., out dims...),
    the first `linear_in_dims` axes being the input.
    """

    template: str
    path: tuple[str, ...]
    linear_in_dims: int | None = None
    aliases: tuple[str, ...] = ()

    @property
    def stacked(self) -> bool:
        return "{i}" in self.template

    def hub_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.linear_in_dims is None:
            return param_shape
        n = self.linear_in_dims
        return (math.prod(param_shape[n:]), math.prod(param_shape[:n]))

    def to_param_layout(self, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        if self.linear_in_dims is None:
            return tensor
        return tensor.T.reshape(param_shape)


def _layer(template: str, path: tuple[str, ...], linear_in_dims=None, aliases=()) -> KeyRule:
    return KeyRule("layers.{i}." + template, ("layers",) + path, linear_in_dims, aliases)


TEXT_RULES: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", ("embed_tokens",)),
    KeyRule("norm.weight", ("norm", "scale")),
    KeyRule("lm_head.weight", ("lm_head",), linear_in_dims=1),
    _layer("input_layernorm.weight", ("input_layernorm", "scale")),
    _layer("post_attention_layernorm.weight", ("post_attention_layernorm", "scale")),
    _layer("self_attn.q_proj.weight", ("self_attn", "q_proj"), 1),
    _layer("self_attn.k_proj.weight", ("self_attn", "k_proj"), 1),
    _layer("self_attn.v_proj.weight", ("self_attn", "v_proj"), 1),
    _layer("self_attn.o_proj.weight", ("self_attn", "o_proj"), 2),
    _layer("mlp.router.weight", ("mlp", "router"), 1),
    _layer("mlp.experts.fc1.weight", ("mlp", "experts_gate_up"), aliases=("mlp.experts.gate_up_proj",)),
    _layer("mlp.experts.fc2.weight", ("mlp", "experts_down"), aliases=("mlp.experts.down_proj",)),
    _layer("mlp.shared_experts.gate_proj.weight", ("mlp", "shared_gate"), 1),
    _layer("mlp.shared_experts.up_proj.weight", ("mlp", "shared_up"), 1),
    _layer("mlp.shared_experts.down_proj.weight", ("mlp", "shared_down"), 1),
)

# Keys that belong to the text model but carry nothing we load.
TEXT_IGNORED = (re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


@dataclasses.dataclass(frozen=True)
class TextNaming:
    """Where the text model's keys live in one key generation."""

    name: str
    body_prefix: str      # prefix of embed_tokens / layers / norm
    lm_head_key: str
    other_prefixes: tuple[str, ...]  # keys of other components (vision tower, projector)

    def hub_key(self, rule: KeyRule, layer: int | None = None, template: str | None = None) -> str:
        template = template or rule.template
        if rule.path == ("lm_head",):
            return self.lm_head_key
        return self.body_prefix + (template.format(i=layer) if rule.stacked else template)


NAMINGS = (
    TextNaming("text-only", "model.", "lm_head.weight", ()),
    TextNaming("multimodal hub", "language_model.model.", "language_model.lm_head.weight",
               ("vision_tower.", "multi_modal_projector.")),
    TextNaming("transformers in-memory", "model.language_model.", "lm_head.weight",
               ("model.vision_tower.", "model.multi_modal_projector.")),
)


def detect_text_naming(keys: Iterable[str]) -> TextNaming:
    """The multimodal generations are recognised by their prefix; anything else is text-only."""
    keys = list(keys)
    for naming in NAMINGS[1:]:
        if any(k.startswith(naming.body_prefix) for k in keys):
            return naming
    return NAMINGS[0]


# ----------------------------------------------------------------------------- the checkpoint

class HubCheckpoint:
    """The safetensors files of a hub-format directory, keyed by tensor name."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        files = self._safetensors_files()
        self.files = [SafetensorsFile(f) for f in files]
        self.file_of: dict[str, SafetensorsFile] = {}
        for file in self.files:
            for key in file.keys():
                if key in self.file_of:
                    raise CheckpointError(
                        f"{file.path}: duplicated key {key} (also in {self.file_of[key].path})"
                    )
                self.file_of[key] = file
        self._check_index()

    def _safetensors_files(self) -> list[str]:
        path = self.path
        if os.path.isfile(path):
            _refuse_pickle([path])
            return [path]
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = self._read_index(index)
            names = sorted(set(weight_map.values()))
            for name in names:
                if not os.path.isfile(os.path.join(path, name)):
                    raise CheckpointError(f"{index}: lists shard {name}, which is not in {path}")
            return [os.path.join(path, name) for name in names]
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            _refuse_pickle(sorted(glob.glob(os.path.join(path, "*"))))
            raise CheckpointError(f"{path}: no *.safetensors files")
        if len(files) > 1:
            raise CheckpointError(
                f"{path}: {len(files)} safetensors files but no {INDEX_FILE} to say which to read"
            )
        return files

    def _read_index(self, index: str) -> dict[str, str]:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        self._weight_map = weight_map
        return weight_map

    def _check_index(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if weight_map is None:
            return
        for key, name in weight_map.items():
            file = self.file_of.get(key)
            if file is None or os.path.basename(file.path) != name:
                raise CheckpointError(
                    f"{os.path.join(self.path, INDEX_FILE)}: key {key} is listed in {name} but not found there"
                )

    def keys(self) -> list[str]:
        return list(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self.file_of[key].get(key)


def _refuse_pickle(paths: list[str]) -> None:
    for p in paths:
        if p.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{p}: pickle checkpoints are not loaded (unpickling can run arbitrary code); "
                "save the model as safetensors (transformers: save_pretrained(..., safe_serialization=True))"
            )


# ----------------------------------------------------------------------------- planning

@dataclasses.dataclass(frozen=True)
class Source:
    """One hub tensor feeding one param (or one layer slice of a stacked param)."""

    key: str
    rule: KeyRule


def plan_text_load(checkpoint: HubCheckpoint, param_shapes: dict[tuple[str, ...], tuple[int, ...]],
                   num_layers: int) -> dict[tuple[str, ...], list[Source]]:
    """Maps every param path to its hub tensors (one per layer for stacked params), checking the
    checkpoint: unknown, duplicated, mis-shaped and missing keys are errors naming the key."""
    naming = detect_text_naming(checkpoint.keys())
    by_key: dict[str, tuple[KeyRule, int | None]] = {}
    for rule in TEXT_RULES:
        for template in (rule.template,) + tuple("layers.{i}." + a for a in rule.aliases):
            if rule.stacked:
                for i in range(num_layers):
                    by_key[naming.hub_key(rule, i, template)] = (rule, i)
            else:
                by_key[naming.hub_key(rule, template=template)] = (rule, None)

    plan: dict[tuple[str, ...], list[Source | None]] = {
        rule.path: [None] * (num_layers if rule.stacked else 1) for rule in TEXT_RULES
    }
    for key in checkpoint.keys():
        if key not in by_key:
            if key.startswith(naming.other_prefixes):
                continue
            body = key[len(naming.body_prefix):] if key.startswith(naming.body_prefix) else None
            if body is not None and any(p.fullmatch(body) for p in TEXT_IGNORED):
                continue
            raise CheckpointError(
                f"{checkpoint.file_of[key].path}: unknown key {key} (checkpoint naming: {naming.name})"
            )
        rule, layer = by_key[key]
        slot = layer or 0
        if plan[rule.path][slot] is not None:
            raise CheckpointError(
                f"{checkpoint.file_of[key].path}: duplicated key {key}: same tensor as "
                f"{plan[rule.path][slot].key}"
            )
        per_layer_shape = param_shapes[rule.path][1:] if rule.stacked else param_shapes[rule.path]
        expected = rule.hub_shape(per_layer_shape)
        if checkpoint.shape(key) != expected:
            raise CheckpointError(
                f"{checkpoint.file_of[key].path}: key {key} has shape {checkpoint.shape(key)}, "
                f"expected {expected}"
            )
        plan[rule.path][slot] = Source(key, rule)

    missing = [
        naming.hub_key(rule, i if rule.stacked else None)
        for rule in TEXT_RULES for i, source in enumerate(plan[rule.path]) if source is None
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint.path}: missing key {missing[0]}{more}")
    return plan


# ----------------------------------------------------------------------------- reading

def read_param(checkpoint: HubCheckpoint, sources: list[Source], shape: tuple[int, ...], dtype,
               stacked: bool, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The (slice `index` of the) param built from its hub tensors, one tensor in memory at a time."""
    index = index or tuple(slice(None) for _ in shape)

    def one(source: Source, param_shape, rest):
        tensor = source.rule.to_param_layout(checkpoint.get(source.key), param_shape)
        return np.asarray(tensor[rest], dtype=dtype)

    if not stacked:
        return one(sources[0], shape, index)
    layers = range(shape[0])[index[0]]
    out = np.empty((len(layers),) + tuple(len(range(n)[s]) for n, s in zip(shape[1:], index[1:])), dtype)
    for row, layer in enumerate(layers):
        out[row] = one(sources[layer], shape[1:], index[1:])
    return out


def load_text_params(checkpoint: HubCheckpoint | str | os.PathLike, param_shapes_tree: dict, num_layers: int,
                     dtype, sharding_for: Callable[[tuple[str, ...]], jax.sharding.Sharding] | None = None) -> dict:
    """Builds the text params tree (same structure as `param_shapes_tree`, a tree of shapes)
    directly from the checkpoint, each array placed in `sharding_for(path)` (default: device 0).
    Each device's shard is read by callback, so a host reads only what its devices hold."""
    if not isinstance(checkpoint, HubCheckpoint):
        checkpoint = HubCheckpoint(checkpoint)
    flat_shapes = {
        tuple(k.key for k in key_path): tuple(shape)
        for key_path, shape in jax.tree_util.tree_flatten_with_path(
            param_shapes_tree, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }
    plan = plan_text_load(checkpoint, flat_shapes, num_layers)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    flat = {}
    for param_path, sources in plan.items():
        shape = flat_shapes[param_path]
        stacked = sources[0].rule.stacked
        sharding = sharding_for(param_path) if sharding_for else default
        flat[param_path] = jax.make_array_from_callback(
            shape, sharding,
            lambda index, s=sources, sh=shape, st=stacked: read_param(checkpoint, s, sh, dtype, st, index),
        )
    return _unflatten(flat)


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree
