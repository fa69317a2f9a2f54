"""LoRA adapters for the text decoder: W + (alpha / rank) A @ B on chosen weights.

Targets are the decoder's attention projections, its shared experts, its grouped experts (one
A (E, in, r) and one B (E, r, out) per expert tensor, as the original `GroupedGemmLoraLayer`)
and, optionally, lm_head. Adapters live in their own tree, shaped like the params tree with
`{name}_lora_a` / `{name}_lora_b` beside each target (stacked over layers like the weights),
and reach the model as the "lora" collection (`aria_jax.layers.adapted`). B starts at zero, so
fresh adapters leave the model unchanged.

`merge_adapters` folds them into the weights for inference; `save_adapters` / `load_adapters`
keep them alone (adapter_model.safetensors + adapter_config.json).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from aria_jax.expert_weights import ROUTED_EXPERT_AXES
from aria_jax.files import atomic_directory, write_json
from aria_jax.layers import lora_delta
from aria_jax.weights import flatten_tree, unflatten_tree

# Target weight -> (expert dims, input dims) of its shape after the layer axis.
TARGET_LAYOUT = {
    "q_proj": (0, 1),
    "k_proj": (0, 1),
    "v_proj": (0, 1),
    "o_proj": (0, 2),
    "shared_gate": (0, 1),
    "shared_up": (0, 1),
    "shared_down": (0, 1),
    **dict.fromkeys(ROUTED_EXPERT_AXES, (1, 1)),
    "lm_head": (0, 1),
}
DEFAULT_TARGETS = tuple(name for name in TARGET_LAYOUT if name != "lm_head")
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


class AdapterError(ValueError):
    """Adapters that do not fit the model or are not readable; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r} must be a positive integer")
        unknown = sorted(set(self.targets) - set(TARGET_LAYOUT))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from {', '.join(TARGET_LAYOUT)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _target_shapes(path: tuple[str, ...], shape: tuple[int, ...], rank: int):
    """(batch dims, fan in, A shape, B shape) of the adapter of the weight at `path`; batch dims
    are the layer axis (stacked weights) and the expert axis."""
    num_experts, num_in = TARGET_LAYOUT[path[-1]]
    batch = (1 if "layers" in path else 0) + num_experts
    in_shape, out_shape = shape[batch : batch + num_in], shape[batch + num_in :]
    return batch, math.prod(in_shape), shape[:batch] + in_shape + (rank,), shape[:batch] + (rank,) + out_shape


def _targets(params: dict, config: LoraConfig):
    for path, leaf in flatten_tree(params).items():
        if path[-1] in config.targets and "vision_tower" not in path and "multi_modal_projector" not in path:
            yield path, leaf


def init_adapters(params: dict, config: LoraConfig, rng: jax.Array) -> dict:
    """Fresh adapters for `params` (a multimodal or text-only params tree, or its shapes):
    A uniform in +-1/sqrt(fan_in) (torch Linear's default, as PEFT), B zero."""
    flat = {}
    for index, (path, weight) in enumerate(_targets(params, config)):
        _, fan_in, a_shape, b_shape = _target_shapes(path, tuple(weight.shape), config.rank)
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, index)
        flat[path[:-1] + (path[-1] + SUFFIX_A,)] = jax.random.uniform(key, a_shape, weight.dtype, -bound, bound)
        flat[path[:-1] + (path[-1] + SUFFIX_B,)] = jnp.zeros(b_shape, weight.dtype)
    if not flat:
        raise ValueError(f"no weight named {list(config.targets)} in the params: nothing to adapt")
    return unflatten_tree(flat)


def scaled_adapters(adapters: dict, config: LoraConfig) -> dict:
    """The "lora" collection the model reads: A pre-multiplied by alpha / rank."""
    flat = flatten_tree(adapters)
    return unflatten_tree(
        {path: leaf * config.scale if path[-1].endswith(SUFFIX_A) else leaf for path, leaf in flat.items()}
    )


def merge_adapters(params: dict, adapters: dict, config: LoraConfig) -> dict:
    """params with W + (alpha / rank) A @ B in place of each adapted weight."""
    flat_adapters = flatten_tree(adapters)
    merged = {}
    for path, weight in flatten_tree(params).items():
        a = flat_adapters.get(path[:-1] + (path[-1] + SUFFIX_A,))
        if a is None:
            merged[path] = weight
            continue
        b = flat_adapters[path[:-1] + (path[-1] + SUFFIX_B,)]
        batch, _, _, _ = _target_shapes(path, tuple(weight.shape), config.rank)
        delta = lora_delta(a.astype(jnp.float32) * config.scale, b.astype(jnp.float32), batch)
        merged[path] = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
    return unflatten_tree(merged)


def is_adapter_directory(directory: str) -> bool:
    """Whether `directory` holds exactly what `save_adapters` writes."""
    return sorted(os.listdir(directory)) == sorted([ADAPTER_FILE, CONFIG_FILE])


def save_adapters(adapters: dict, config: LoraConfig, directory: str | os.PathLike, overwrite: bool = False) -> None:
    """adapter_model.safetensors (keys: param paths joined by ".") + adapter_config.json."""
    tensors = {".".join(path): np.asarray(jax.device_get(leaf)) for path, leaf in flatten_tree(adapters).items()}
    with atomic_directory(
        directory, overwrite=overwrite, replaceable=is_adapter_directory, what="a LoRA adapter directory"
    ) as partial:
        safetensors.numpy.save_file(tensors, os.path.join(partial, ADAPTER_FILE))
        write_json(
            os.path.join(partial, CONFIG_FILE),
            {"format": "aria_jax_lora", "rank": config.rank, "alpha": config.alpha, "targets": list(config.targets)},
        )


def load_adapters(directory: str | os.PathLike, params: dict | None = None) -> tuple[dict, LoraConfig]:
    """Adapters written by `save_adapters`; with `params`, each is checked to fit its weight."""
    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, ADAPTER_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: not found; LoRA adapters are saved as {ADAPTER_FILE} + {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
        config = LoraConfig(rank=settings["rank"], alpha=settings["alpha"], targets=tuple(settings["targets"]))
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{config_path}: not a valid adapter config ({e})") from None
    try:
        tensors = safetensors.numpy.load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None
    adapters = unflatten_tree({tuple(key.split(".")): value for key, value in tensors.items()})
    if params is not None:
        init = functools.partial(init_adapters, params, config)
        expected = {path: leaf.shape for path, leaf in flatten_tree(jax.eval_shape(init, jax.random.key(0))).items()}
        for path, value in flatten_tree(adapters).items():
            key = ".".join(path)
            if path not in expected:
                raise AdapterError(f"{weights_path}: {key} adapts no weight of this model")
            if tuple(value.shape) != expected[path]:
                raise AdapterError(
                    f"{weights_path}: {key} has shape {tuple(value.shape)}, the model needs {expected[path]}"
                )
        missing = sorted(".".join(p) for p in set(expected) - set(flatten_tree(adapters)))
        if missing:
            raise AdapterError(
                f"{weights_path}: missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    return adapters, config
