"""Hub checkpoints (safetensors, single or sharded) into our params tree.

One table says where every hub tensor goes. Loading checks the whole checkpoint against it
before reading any data: an unknown, missing, duplicated or mis-shaped key is an error that
names the file and the key. Tensors are read from memory maps one at a time, straight into
the arrays they belong to; no file is ever read whole into a dict, and only safetensors are
read (a pickle checkpoint is refused without being opened).

Four key generations are read; `canonical_key` maps each onto the hub's multimodal naming (what
rhymes-ai/Aria ships and transformers' `save_pretrained` writes), which the table uses. No tensor
is transposed between generations: only names differ.
- multimodal hub checkpoints:      `language_model.model.layers.{i}...`, `vision_tower.encoder...`,
                                   `multi_modal_projector...`
- original rhymes-ai checkpoints:  `vision_tower.vision_model...`, projector `ln_ffn`, `ffn`, `ln_kv`,
                                   and `rotary_emb.inv_freq` buffers (recomputed, skipped)
- text-only checkpoints:           `model.layers.{i}...`, `lm_head.weight`
- transformers 5 in-memory names:  `model.language_model...`, `model.vision_tower...`, `lm_head.weight`,
                                   experts as `gate_up_proj` / `down_proj`
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
from typing import Callable

import jax
import numpy as np

from aria_jax.quantization import Quantization
from aria_jax.safetensors_io import DTYPE_NAMES, FLOAT_DTYPES, CheckpointError, SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- the key table


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a hub tensor becomes a param: `hub_shape(param_shape)` and `to_param(tensor, param_shape)`.

    copy:     stored as we store it (experts are (E, in, out) on the hub already).
    linear n: a torch Linear weight (out, in); our kernel is its transpose reshaped to
              (in dims..., out dims...), the first n axes being the input.
    reshape:  same data, our param splits its one axis (a bias into (heads, head_dim)).
    conv:     a torch Conv2d weight (out, in, kh, kw); ours is (in, kh, kw, out).
    conv3d:   a torch Conv3d weight (out, in, kt, kh, kw); ours is (in, kt, kh, kw, out).
    """

    kind: str
    linear_in_dims: int = 0

    def hub_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "linear":
            n = self.linear_in_dims
            return (math.prod(param_shape[n:]), math.prod(param_shape[:n]))
        if self.kind == "reshape":
            return (math.prod(param_shape),)
        if self.kind == "conv":
            return (param_shape[3],) + tuple(param_shape[:3])
        if self.kind == "conv3d":
            return (param_shape[4],) + tuple(param_shape[:4])
        return tuple(param_shape)

    def to_param(self, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            return tensor.T.reshape(param_shape)
        if self.kind == "reshape":
            return tensor.reshape(param_shape)
        if self.kind == "conv":
            return tensor.transpose(1, 2, 3, 0)
        if self.kind == "conv3d":
            return tensor.transpose(1, 2, 3, 4, 0)
        return tensor

    def to_hub(self, param: np.ndarray) -> np.ndarray:
        """The inverse of `to_param`: a param (one layer of it, if stacked) as the hub stores it."""
        if self.kind == "linear":
            return param.reshape(self.hub_shape(param.shape)[::-1]).T
        if self.kind == "reshape":
            return param.reshape(-1)
        if self.kind == "conv":
            return param.transpose(3, 0, 1, 2)
        if self.kind == "conv3d":
            return param.transpose(4, 0, 1, 2, 3)
        return param


COPY, RESHAPE, CONV = Layout("copy"), Layout("reshape"), Layout("conv")
LINEAR, LINEAR_2_IN = Layout("linear", 1), Layout("linear", 2)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Hub tensor `template` (canonical naming, `{i}` for the layer) -> param at `path`.

    With `parts`, the template names one tensor per part (`{part}`), stacked along the param's
    axis after the layers one, in this order: LoRA experts stored one tensor each (Awaker's)."""

    template: str
    path: tuple[str, ...]
    layout: Layout = COPY
    parts: tuple[str, ...] = ()

    @property
    def stacked(self) -> bool:
        return "{i}" in self.template

    @property
    def num_parts(self) -> int:
        return max(1, len(self.parts))

    def keys(self, num_layers: int) -> list[str]:
        """Every hub key of the rule, in plan order: layer by layer, part by part."""
        layers = range(num_layers) if self.stacked else [0]
        return [self.template.format(i=i, part=part) for i in layers for part in self.parts or [None]]

    def part_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape one hub tensor fills: the param's without its layer and part axes."""
        return tuple(param_shape)[int(self.stacked) + int(bool(self.parts)) :]


def _rules(prefix: str, path: tuple[str, ...], entries) -> tuple[KeyRule, ...]:
    return tuple(KeyRule(prefix + template, path + sub, layout) for template, sub, layout in entries)


def _linear(template: str, path: tuple[str, ...], layout=LINEAR, bias: Layout | None = COPY):
    """A torch Linear: weight into path/kernel, bias (if any) into path/bias."""
    entries = [(template + ".weight", path + ("kernel",), layout)]
    if bias is not None:
        entries.append((template + ".bias", path + ("bias",), bias))
    return entries


def _norm(template: str, path: tuple[str, ...], bias=True):
    entries = [(template + ".weight", path + ("scale",), COPY)]
    if bias:
        entries.append((template + ".bias", path + ("bias",), COPY))
    return entries


# Canonical names are the hub's multimodal naming; `canonical_key` maps the others onto it.
TEXT_RULES = _rules(
    "language_model.",
    ("language_model",),
    [
        ("model.embed_tokens.weight", ("embed_tokens",), COPY),
        ("model.norm.weight", ("norm", "scale"), COPY),
        ("lm_head.weight", ("lm_head",), LINEAR),
        ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), COPY),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), COPY),
        ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj"), LINEAR),
        ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj"), LINEAR),
        ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj"), LINEAR),
        ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj"), LINEAR_2_IN),
        ("model.layers.{i}.mlp.router.weight", ("layers", "mlp", "router"), LINEAR),
        ("model.layers.{i}.mlp.experts.fc1.weight", ("layers", "mlp", "experts_gate_up"), COPY),
        ("model.layers.{i}.mlp.experts.fc2.weight", ("layers", "mlp", "experts_down"), COPY),
        ("model.layers.{i}.mlp.shared_experts.gate_proj.weight", ("layers", "mlp", "shared_gate"), LINEAR),
        ("model.layers.{i}.mlp.shared_experts.up_proj.weight", ("layers", "mlp", "shared_up"), LINEAR),
        ("model.layers.{i}.mlp.shared_experts.down_proj.weight", ("layers", "mlp", "shared_down"), LINEAR),
    ],
)

_VISION_LAYER = "encoder.layers.{i}."
VISION_RULES = _rules(
    "vision_tower.",
    ("vision_tower",),
    [
        ("embeddings.patch_embedding.weight", ("patch_kernel",), CONV),
        ("embeddings.patch_embedding.bias", ("patch_bias",), COPY),
        ("embeddings.position_embedding.weight", ("position_embedding",), COPY),
        *_norm(_VISION_LAYER + "layer_norm1", ("layers", "layer_norm1")),
        *_norm(_VISION_LAYER + "layer_norm2", ("layers", "layer_norm2")),
        *_linear(_VISION_LAYER + "self_attn.q_proj", ("layers", "self_attn", "q_proj"), bias=RESHAPE),
        *_linear(_VISION_LAYER + "self_attn.k_proj", ("layers", "self_attn", "k_proj"), bias=RESHAPE),
        *_linear(_VISION_LAYER + "self_attn.v_proj", ("layers", "self_attn", "v_proj"), bias=RESHAPE),
        *_linear(_VISION_LAYER + "self_attn.out_proj", ("layers", "self_attn", "out_proj"), LINEAR_2_IN),
        *_linear(_VISION_LAYER + "mlp.fc1", ("layers", "fc1")),
        *_linear(_VISION_LAYER + "mlp.fc2", ("layers", "fc2")),
    ],
)

PROJECTOR_RULES = _rules(
    "multi_modal_projector.",
    ("multi_modal_projector",),
    [
        ("query", ("query",), COPY),
        *_norm("cross_attn.layer_norm", ("cross_attn", "layer_norm")),
        *_norm("cross_attn.layer_norm_kv", ("cross_attn", "layer_norm_kv")),
        *_linear("cross_attn.q_proj", ("cross_attn", "q_proj"), bias=None),
        *_linear("cross_attn.k_proj", ("cross_attn", "k_proj"), bias=None),
        *_linear("cross_attn.v_proj", ("cross_attn", "v_proj"), bias=None),
        ("cross_attn.multihead_attn.in_proj_weight", ("cross_attn", "in_proj_kernel"), LINEAR),
        ("cross_attn.multihead_attn.in_proj_bias", ("cross_attn", "in_proj_bias"), RESHAPE),
        *_linear("cross_attn.multihead_attn.out_proj", ("cross_attn", "out_proj"), LINEAR_2_IN),
        *_linear("cross_attn.linear", ("cross_attn", "linear")),
        *_norm("layer_norm", ("layer_norm",)),
        *_linear("feed_forward.linear_in", ("linear_in",), bias=None),
        *_linear("feed_forward.linear_out", ("linear_out",), bias=None),
    ],
)

ALL_RULES = TEXT_RULES + VISION_RULES + PROJECTOR_RULES
COMPONENTS = ("language_model", "vision_tower", "multi_modal_projector")

# Keys that carry nothing we load: rotary buffers of old files (recomputed) and the vision
# tower's post_layernorm, which Aria does not apply (hub files store it as zeros).
IGNORED = (
    re.compile(r"language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    re.compile(r"vision_tower\.post_layernorm\.(weight|bias)"),
)

# Other generations -> canonical, applied in order. The original -> hub renames are those of
# transformers' `src/transformers/models/aria/convert_aria_weights_to_hf.py` (KEYS_TO_MODIFY_MAPPING;
# it also drops `.inv_freq` buffers). The transformers 5 in-memory names are undone by inverting
# the load-time renames of `transformers/conversion_mapping.py` (its "llava", "LlavaModel" and
# "aria_text" rules).
RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^model\.language_model\.", "language_model.model."),  # transformers 5 in-memory
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.", "language_model.model."),  # text-only checkpoints
        (r"^lm_head\.weight$", "language_model.lm_head.weight"),
        (r"^vision_tower\.vision_model\.", "vision_tower."),  # original rhymes-ai
        (r"^multi_modal_projector\.ln_ffn\.", "multi_modal_projector.layer_norm."),
        (r"^multi_modal_projector\.ffn\.", "multi_modal_projector.feed_forward."),
        (r"\.cross_attn\.ln_kv\.", ".cross_attn.layer_norm_kv."),
        (r"\.mlp\.experts\.gate_up_proj$", ".mlp.experts.fc1.weight"),  # transformers 5 in-memory
        (r"\.mlp\.experts\.down_proj$", ".mlp.experts.fc2.weight"),
    )
)


RULE_FOR_PATH = {rule.path: rule for rule in ALL_RULES}


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A model family's hub checkpoints: where every tensor goes (`rules`, in the canonical
    naming), how other namings map onto it (`renames`, applied in order), keys that carry nothing
    to load (`ignored`), the params' top-level components, and what to say when a checkpoint
    lacks one of them (`without_component`)."""

    rules: tuple[KeyRule, ...]
    renames: tuple[tuple[re.Pattern, str], ...]
    ignored: tuple[re.Pattern, ...]
    components: tuple[str, ...]
    without_component: str

    def canonical(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = pattern.sub(replacement, key, count=1)
        return key

    @functools.cached_property
    def _rule_of_path(self) -> dict[tuple[str, ...], KeyRule]:
        return {rule.path: rule for rule in self.rules}

    def rule_for_path(self, path: tuple[str, ...]) -> KeyRule | None:
        return self._rule_of_path.get(path)


ARIA_KEYS = KeyTable(
    ALL_RULES,
    RENAMES,
    IGNORED,
    COMPONENTS,
    "has no {component} weights (a text-only checkpoint?); load it with AriaTextForCausalLM",
)
# Text-only checkpoints (AriaTextForCausalLM) name the decoder without the component prefix.
TEXT_ONLY_NAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


def hub_key(rule: KeyRule, layer: int | None, text_only: bool = False) -> str:
    """The name `save_pretrained` gives the tensor of `rule` (at `layer`, if stacked)."""
    key = rule.template.format(i=layer) if rule.stacked else rule.template
    if text_only:
        for prefix, replacement in TEXT_ONLY_NAMES:
            if key.startswith(prefix):
                return replacement + key[len(prefix) :]
    return key


def canonical_key(key: str) -> str:
    """Aria's canonical name of a key (`KeyTable.canonical` of `ARIA_KEYS`)."""
    return ARIA_KEYS.canonical(key)


def spelled_like(missing: str, present: dict[str, str]) -> str:
    """A missing canonical key spelled the way the checkpoint spells its keys, for messages.

    `present` maps the canonical keys found to the checkpoint's own. The same tensor of another
    layer gives the spelling with the layer number swapped; otherwise the closest present key
    (longest shared start) whose renaming was a change of prefix lends that prefix."""
    layer = re.search(r"layers\.\d+\.", missing)
    if layer:
        twin = re.compile(re.escape(missing[: layer.start()]) + r"layers\.(\d+)\." + re.escape(missing[layer.end() :]))
        for canonical, raw in present.items():
            match = twin.fullmatch(canonical)
            if match:
                return raw.replace(f"layers.{match.group(1)}.", layer.group(0), 1)
    for canonical in sorted(present, key=lambda key: -len(os.path.commonprefix([key, missing]))):
        raw = present[canonical]
        shared_tail = len(os.path.commonprefix([canonical[::-1], raw[::-1]]))
        canonical_head, raw_head = canonical[: len(canonical) - shared_tail], raw[: len(raw) - shared_tail]
        if missing.startswith(canonical_head):
            return raw_head + missing[len(canonical_head) :]
    return missing


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
                    raise CheckpointError(f"{file.path}: duplicated key {key} (also in {self.file_of[key].path})")
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
            raise CheckpointError(f"{path}: {len(files)} safetensors files but no {INDEX_FILE} to say which to read")
        return files

    def _read_index(self, index: str) -> dict[str, str]:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is a JSON {type(weight_map).__name__}, not an object")
        for key, name in weight_map.items():
            # Shards are files of this directory: a path elsewhere is not followed.
            if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: key {key} is listed in {name!r}, not a .safetensors file name")
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

    def dtype(self, key: str) -> np.dtype:
        return self.file_of[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self.file_of[key].get(key)

    def file_path(self, key: str) -> str:
        return self.file_of[key].path

    def nbytes(self, key: str) -> int:
        return self.file_of[key].nbytes(key)

    def read(self, key: str) -> np.ndarray:
        """A fresh copy (`SafetensorsFile.read`): nothing stays mapped once it is dropped."""
        return self.file_of[key].read(key)


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
    """One hub tensor feeding one param (or one layer slice of a stacked param, or one part)."""

    key: str
    rule: KeyRule


def plan_load(
    checkpoint: HubCheckpoint,
    param_shapes: dict[tuple[str, ...], tuple[int, ...]],
    components: tuple[str, ...],
    table: KeyTable = ARIA_KEYS,
) -> dict[tuple[str, ...], list[Source]]:
    """Maps every param path (of `components`) to its hub tensors, one per layer for stacked
    params (and per part, layer by layer, for rules with parts), checking the checkpoint from its headers alone: unknown, duplicated, mis-shaped and
    missing keys are errors naming the file and the key. `checkpoint`: anything with keys(),
    shape(key), dtype(key), get(key), file_path(key) and path (`torch_pickle.TorchZipCheckpoint`
    too)."""
    rules = [rule for rule in table.rules if rule.path[0] in components]
    by_key: dict[str, tuple[KeyRule, int]] = {}
    for rule in rules:
        for slot, key in enumerate(rule.keys(param_shapes[rule.path][0])):
            by_key[key] = (rule, slot)

    raw_keys = checkpoint.keys()
    present = {table.canonical(key).split(".")[0] for key in raw_keys}
    for component in components:
        prefix = next(rule.template.split(".")[0] for rule in rules if rule.path[0] == component)
        if component != "language_model" and prefix not in present:
            raise CheckpointError(f"{checkpoint.path}: " + table.without_component.format(component=component))
    plan: dict[tuple[str, ...], list[Source | None]] = {
        rule.path: [None] * len(rule.keys(param_shapes[rule.path][0])) for rule in rules
    }
    other_components = tuple(
        rule.template.split(".")[0] + "." for rule in table.rules if rule.path[0] not in components
    )
    for key in raw_keys:
        canonical = table.canonical(key)
        file = checkpoint.file_path(key)
        if canonical not in by_key:
            known_elsewhere = bool(other_components) and canonical.startswith(other_components)
            if known_elsewhere or any(p.fullmatch(canonical) for p in table.ignored):
                continue
            raise CheckpointError(f"{file}: unknown key {key}")
        rule, slot = by_key[canonical]
        if plan[rule.path][slot] is not None:
            raise CheckpointError(f"{file}: duplicated key {key}: the same tensor as {plan[rule.path][slot].key}")
        expected = rule.layout.hub_shape(rule.part_shape(param_shapes[rule.path]))
        if checkpoint.shape(key) != expected:
            raise CheckpointError(f"{file}: key {key} has shape {checkpoint.shape(key)}, expected {expected}")
        if checkpoint.dtype(key) not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{file}: key {key} has dtype {DTYPE_NAMES[checkpoint.dtype(key)]}; the model's weights "
                f"are floating point ({', '.join(DTYPE_NAMES[t] for t in FLOAT_DTYPES)})"
            )
        plan[rule.path][slot] = Source(key, rule)

    missing = [
        key
        for rule in rules
        for key, source in zip(rule.keys(param_shapes[rule.path][0]), plan[rule.path])
        if source is None
    ]
    if missing:
        present = {table.canonical(key): key for key in raw_keys}
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint.path}: missing key {spelled_like(missing[0], present)}{more}")
    return plan


# ----------------------------------------------------------------------------- reading


def read_param(
    checkpoint: HubCheckpoint,
    sources: list[Source],
    shape: tuple[int, ...],
    dtype,
    index: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """The (slice `index` of the) param built from its hub tensors, one tensor in memory at a time."""
    index = index or tuple(slice(None) for _ in shape)

    rule = sources[0].rule

    def one(source: Source, param_shape, rest):
        tensor = source.rule.layout.to_param(checkpoint.get(source.key), param_shape)
        return np.asarray(tensor[rest], dtype=dtype)

    def one_layer(layer_sources: list[Source], param_shape, rest):
        if not rule.parts:
            return one(layer_sources[0], param_shape, rest)
        parts = range(param_shape[0])[rest[0]]
        return np.stack([one(layer_sources[p], param_shape[1:], rest[1:]) for p in parts]).astype(dtype, copy=False)

    if not rule.stacked:
        return one_layer(sources, shape, index)
    layers = range(shape[0])[index[0]]
    out = np.empty((len(layers),) + tuple(len(range(n)[s]) for n, s in zip(shape[1:], index[1:])), dtype)
    for row, layer in enumerate(layers):
        out[row] = one_layer(layer_sources(sources, layer), shape[1:], index[1:])
    return out


def layer_sources(sources: list[Source], layer: int | None) -> list[Source]:
    """A stacked param's sources for one layer (one per part), or an unstacked param's all."""
    if layer is None:
        return sources
    parts = sources[0].rule.num_parts
    return sources[layer * parts : (layer + 1) * parts]


def load_params(
    checkpoint: HubCheckpoint | str | os.PathLike,
    param_shapes_tree: dict,
    dtype,
    components: tuple[str, ...] = COMPONENTS,
    sharding_for: Callable[[tuple[str, ...]], jax.sharding.Sharding] | None = None,
    quantization: Quantization | None = None,
    table: KeyTable = ARIA_KEYS,
) -> dict:
    """Builds the params of `components` (a tree {component: subtree of shape tuples}) directly
    from the checkpoint, each array placed in `sharding_for(path)` (default: device 0). Arrays
    are filled by callback, so a host reads only the layers its devices hold. With
    `quantization`, the weights it covers are quantized as they are read (`quantized_part`)."""
    if not isinstance(checkpoint, HubCheckpoint):
        checkpoint = HubCheckpoint(checkpoint)
    flat_shapes = flatten_tree(param_shapes_tree)
    plan = plan_load(checkpoint, flat_shapes, components, table)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def placed(path, shape, read):
        return jax.make_array_from_callback(shape, sharding_for(path) if sharding_for else default, read)

    flat = {}
    for path, sources in plan.items():
        shape = flat_shapes[path]
        input_axes = quantization.input_axes(path) if quantization else None
        if input_axes is None:
            flat[path] = placed(
                path, shape, lambda index, s=sources, sh=shape: read_param(checkpoint, s, sh, dtype, index)
            )
            continue
        scales_shape = quantization.scales_shape(path, shape, input_axes)
        for part, part_shape in (("values", shape), ("scales", scales_shape)):

            def read(index, s=sources, sh=shape, p=path, axes=input_axes, part=part):
                return quantized_part(checkpoint, s, sh, index, quantization, p, axes, part)

            flat[path + (part,)] = placed(path + (part,), part_shape, read)
    return unflatten_tree(flat)


def quantized_part(
    checkpoint: HubCheckpoint,
    sources: list[Source],
    shape: tuple[int, ...],
    index: tuple[slice, ...],
    quantization: Quantization,
    path: tuple[str, ...],
    input_axes: tuple[int, ...],
    part: str,
):
    """Slice `index` of a weight's quantized `part` ("values" or "scales"). The weight is read
    whole along its input axes (its scales depend on all of them), quantized, then sliced; the
    values' and scales' reads repeat that work, so memory stays at one slice at a time."""
    whole_inputs = tuple(slice(None) if axis in input_axes else s for axis, s in enumerate(index))
    weight = read_param(checkpoint, sources, shape, np.float32, whole_inputs)
    values, scales = quantization.quantize(weight, path, input_axes)
    along_inputs = tuple(s if axis in input_axes else slice(None) for axis, s in enumerate(index))
    return (values if part == "values" else scales)[along_inputs]


def is_stacked(path: tuple[str, ...]) -> bool:
    """Params of scanned layers live under `<component>/layers`, stacked on a leading axis."""
    return len(path) > 2 and path[1] == "layers"


def flatten_tree(tree: dict) -> dict[tuple[str, ...], object]:
    """{path: leaf} of a nested dict; shape tuples count as leaves."""
    return {
        tuple(k.key for k in key_path): leaf
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    }


def unflatten_tree(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree
